"""Model and data licences: what they are, how they pass to derivatives, what conflicts.

The rules are data (:data:`LICENSES`, one row per licence, properties taken from the
licence texts) plus small functions:

* :func:`lookup` -- a declared id (GGUF ``general.license``, README front matter
  ``license:``, ``--license``) to a :class:`License`; ids are Hugging Face's (``apache-2.0``,
  ``llama3.1``, ``cc-by-nc-4.0``), SPDX spellings are accepted;
* :func:`identify_text` -- a licence *text* (``LICENSE`` file) by fingerprint phrases such
  as "META LLAMA 3 COMMUNITY LICENSE AGREEMENT" or "Gemma Terms of Use";
* :func:`mentioned` -- licences named in prose ("Upstream data: CC BY-NC 4.0");
* :func:`derive` -- the terms of a derivative from its parents' terms and its training
  data's licences: non-commercial data makes it non-commercial, model licences with use
  policies pass on, a merge of parents with incompatible licences is refused
  (:class:`LicenseConflict`) unless forced, and naming clauses (Llama 3: "Llama" at the
  start of the name) produce warnings.

None of this is legal advice; it encodes what the licences say, so that the record keeps
the reasons and a user sees a conflict before distributing a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TypedDict

from folklm.errors import FolkError


@dataclass(frozen=True)
class License:
    """What a licence permits and requires, as far as derivatives are concerned.

    Attributes:
        id: Hugging Face licence id (lower case); what a model card's ``license:`` holds.
        spdx: the SPDX identifier, or None for licences SPDX does not list.
        commercial: commercial use is permitted.
        derivatives: derivative works (fine-tunes, merges, quantizations) are permitted.
        share_alike: derivatives must be distributed under this same licence.
        use_policy: a use policy whose restrictions pass on to every derivative.
        family: licences of one family combine without conflict (``llama3.1`` + ``llama3.2``).
        name_prefix: (regex, required text, example) a derivative's name must start with.
        own_family_only: the model or its outputs must not be used to improve models of
            another family.
        fingerprints: alternatives of phrases (all of one alternative, upper case) that
            identify the licence's text.
    """

    id: str
    name: str
    spdx: str | None
    commercial: bool
    url: str
    derivatives: bool = True
    share_alike: bool = False
    use_policy: str | None = None
    family: str | None = None
    name_prefix: tuple[str, str, str] | None = None
    own_family_only: bool = False
    attribution: str | None = None
    user_limit: str | None = None
    fingerprints: tuple[tuple[str, ...], ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def permissive(self) -> bool:
        return self.commercial and not (self.share_alike or self.use_policy or self.name_prefix)


_META_AUP = "Meta's Acceptable Use Policy (https://llama.meta.com/use-policy)"


class _LicenseTerms(TypedDict):
    """The :class:`License` fields the Llama 3.x community licences share."""

    commercial: bool
    use_policy: str
    family: str
    name_prefix: tuple[str, str, str]
    attribution: str
    user_limit: str


_LLAMA3X = _LicenseTerms(
    commercial=True,
    use_policy=_META_AUP,
    family="llama3",
    name_prefix=(r"llama", '"Llama"', "llama-"),
    attribution='display "Built with Llama"',
    user_limit="over 700 million monthly active users need a licence from Meta",
)
# Specific before general: "Llama 3.1" before "Llama 3", NC-SA before NC before BY.
LICENSES: tuple[License, ...] = (
    License(
        "llama3.3",
        "Llama 3.3 Community License Agreement",
        None,
        url="https://www.llama.com/llama3_3/license/",
        fingerprints=(("LLAMA 3.3 COMMUNITY LICENSE",), ("LLAMA 3.3 VERSION RELEASE DATE",)),
        **_LLAMA3X,
    ),
    License(
        "llama3.2",
        "Llama 3.2 Community License Agreement",
        None,
        url="https://www.llama.com/llama3_2/license/",
        fingerprints=(("LLAMA 3.2 COMMUNITY LICENSE",), ("LLAMA 3.2 VERSION RELEASE DATE",)),
        **_LLAMA3X,
    ),
    License(
        "llama3.1",
        "Llama 3.1 Community License Agreement",
        None,
        url="https://www.llama.com/llama3_1/license/",
        fingerprints=(("LLAMA 3.1 COMMUNITY LICENSE",), ("LLAMA 3.1 VERSION RELEASE DATE",)),
        **_LLAMA3X,
    ),
    License(
        "llama3",
        "Meta Llama 3 Community License Agreement",
        None,
        commercial=True,
        url="https://www.llama.com/llama3/license/",
        use_policy=_META_AUP,
        family="llama3",
        name_prefix=(r"llama[-_. ]?3", '"Llama 3"', "llama-3-"),
        own_family_only=True,
        attribution='display "Built with Meta Llama 3"',
        user_limit="over 700 million monthly active users need a licence from Meta",
        fingerprints=(("META LLAMA 3 COMMUNITY LICENSE",), ("META LLAMA 3 VERSION RELEASE",)),
        aliases=(r"llama[-_ ]?3(?![.\d])",),
    ),
    License(
        "llama2",
        "Llama 2 Community License Agreement",
        None,
        commercial=True,
        url="https://ai.meta.com/llama/license/",
        use_policy=_META_AUP,
        family="llama2",
        own_family_only=True,
        user_limit="over 700 million monthly active users need a licence from Meta",
        fingerprints=(("LLAMA 2 COMMUNITY LICENSE",), ("LLAMA 2 VERSION RELEASE DATE",)),
    ),
    License(
        "gemma",
        "Gemma Terms of Use",
        None,
        commercial=True,
        url="https://ai.google.dev/gemma/terms",
        family="gemma",
        use_policy="the Gemma Prohibited Use Policy (https://ai.google.dev/gemma/prohibited_use_policy)",
        attribution='include the notice "Gemma is provided under and subject to the Gemma '
        'Terms of Use found at ai.google.dev/gemma/terms"',
        fingerprints=(("GEMMA TERMS OF USE",),),
    ),
    License(
        "qwen-research",
        "Qwen Research License Agreement",
        None,
        commercial=False,
        url="https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/LICENSE",
        family="qwen",
        fingerprints=(("QWEN RESEARCH LICENSE AGREEMENT",),),
    ),
    License(
        "qwen",
        "Qwen License Agreement",
        None,
        commercial=True,
        family="qwen",
        url="https://huggingface.co/Qwen/Qwen2.5-72B/blob/main/LICENSE",
        attribution='display "Built with Qwen" or "Improved using Qwen"',
        user_limit="over 100 million monthly active users need a licence from Alibaba Cloud",
        fingerprints=(("QWEN LICENSE AGREEMENT",), ("TONGYI QIANWEN LICENSE AGREEMENT",)),
    ),
    License(
        "mrl",
        "Mistral AI Research License",
        None,
        commercial=False,
        url="https://mistral.ai/licenses/MRL-0.1.md",
        family="mistral",
        fingerprints=(("MISTRAL AI RESEARCH LICENSE",),),
    ),
    License(
        "openrail",
        "Open RAIL License",
        None,
        commercial=True,
        url="https://www.licenses.ai/",
        use_policy="the use restrictions of its Attachment A",
        fingerprints=(("RESPONSIBLE AI LICENSE", "ATTACHMENT A"),),
        aliases=(
            r"bigscience[-_ ]openrail[-_ ]m",
            r"creativeml[-_ ]openrail[-_ ]m",
            r"openrail\+*",
        ),
    ),
    License(
        "cc-by-nc-nd-4.0",
        "CC BY-NC-ND 4.0",
        "CC-BY-NC-ND-4.0",
        commercial=False,
        derivatives=False,
        url="https://creativecommons.org/licenses/by-nc-nd/4.0/",
        fingerprints=(("ATTRIBUTION-NONCOMMERCIAL-NODERIVATIVES 4.0",),),
    ),
    License(
        "cc-by-nc-sa-4.0",
        "CC BY-NC-SA 4.0",
        "CC-BY-NC-SA-4.0",
        commercial=False,
        share_alike=True,
        url="https://creativecommons.org/licenses/by-nc-sa/4.0/",
        fingerprints=(("ATTRIBUTION-NONCOMMERCIAL-SHAREALIKE 4.0",),),
    ),
    License(
        "cc-by-nc-4.0",
        "CC BY-NC 4.0",
        "CC-BY-NC-4.0",
        commercial=False,
        url="https://creativecommons.org/licenses/by-nc/4.0/",
        fingerprints=(("ATTRIBUTION-NONCOMMERCIAL 4.0 INTERNATIONAL",),),
    ),
    License(
        "cc-by-nd-4.0",
        "CC BY-ND 4.0",
        "CC-BY-ND-4.0",
        commercial=True,
        derivatives=False,
        url="https://creativecommons.org/licenses/by-nd/4.0/",
        fingerprints=(("ATTRIBUTION-NODERIVATIVES 4.0 INTERNATIONAL",),),
    ),
    License(
        "cc-by-sa-4.0",
        "CC BY-SA 4.0",
        "CC-BY-SA-4.0",
        commercial=True,
        share_alike=True,
        url="https://creativecommons.org/licenses/by-sa/4.0/",
        fingerprints=(("ATTRIBUTION-SHAREALIKE 4.0 INTERNATIONAL",),),
    ),
    License(
        "cc-by-sa-3.0",
        "CC BY-SA 3.0",
        "CC-BY-SA-3.0",
        commercial=True,
        share_alike=True,
        url="https://creativecommons.org/licenses/by-sa/3.0/",
        fingerprints=(("ATTRIBUTION-SHAREALIKE 3.0",),),
    ),
    License(
        "cc-by-4.0",
        "CC BY 4.0",
        "CC-BY-4.0",
        commercial=True,
        url="https://creativecommons.org/licenses/by/4.0/",
        fingerprints=(("ATTRIBUTION 4.0 INTERNATIONAL",),),
    ),
    License(
        "cc0-1.0",
        "CC0 1.0",
        "CC0-1.0",
        commercial=True,
        url="https://creativecommons.org/publicdomain/zero/1.0/",
        fingerprints=(("CC0 1.0 UNIVERSAL",),),
    ),
    License(
        "gfdl",
        "GNU Free Documentation License",
        "GFDL-1.3-or-later",
        commercial=True,
        share_alike=True,
        url="https://www.gnu.org/licenses/fdl-1.3.html",
        fingerprints=(("GNU FREE DOCUMENTATION LICENSE",),),
        aliases=(r"gfdl(?:[-_ ]1\.[23])?",),
    ),
    License(
        "agpl-3.0",
        "GNU AGPL v3",
        "AGPL-3.0-only",
        commercial=True,
        share_alike=True,
        url="https://www.gnu.org/licenses/agpl-3.0.html",
        fingerprints=(("GNU AFFERO GENERAL PUBLIC LICENSE", "VERSION 3"),),
    ),
    License(
        "gpl-3.0",
        "GNU GPL v3",
        "GPL-3.0-only",
        commercial=True,
        share_alike=True,
        url="https://www.gnu.org/licenses/gpl-3.0.html",
        fingerprints=(("GNU GENERAL PUBLIC LICENSE", "VERSION 3"),),
        aliases=(r"gpl[-_ ]?v?3(?:\.0)?(?:[-_ ](?:only|or[-_ ]later))?",),
    ),
    License(
        "apache-2.0",
        "Apache License 2.0",
        "Apache-2.0",
        commercial=True,
        url="https://www.apache.org/licenses/LICENSE-2.0",
        attribution="keep the LICENSE and NOTICE files and state your changes",
        fingerprints=(("APACHE LICENSE", "VERSION 2.0"),),
        aliases=(r"apache(?:[-_ ]license)?,?(?:[-_ ]version)?[-_ ]?2(?:\.0)?",),
    ),
    License(
        "mit",
        "MIT License",
        "MIT",
        commercial=True,
        url="https://opensource.org/license/mit",
        attribution="keep the copyright and permission notice",
        fingerprints=(("PERMISSION IS HEREBY GRANTED, FREE OF CHARGE",),),
    ),
    License(
        "bsd-3-clause",
        "BSD 3-Clause License",
        "BSD-3-Clause",
        commercial=True,
        url="https://opensource.org/license/bsd-3-clause",
        fingerprints=(("REDISTRIBUTION AND USE IN SOURCE AND BINARY FORMS", "NEITHER THE NAME"),),
        aliases=(r"bsd[-_ ]3[-_ ]clause",),
    ),
)
BY_ID = {lic.id: lic for lic in LICENSES}
# Share-alike licences that accept a derivative under another licence (CC's compatible list).
SHARE_ALIKE_TARGETS = {"cc-by-sa-4.0": {"gpl-3.0"}}


class LicenseConflict(FolkError):
    """Parents' or data licences that cannot be combined; the message names them and why."""


def _key(text: str) -> str:
    text = re.sub(r"[\s_]+", "-", text.strip().lower())
    return re.sub(r"-?licen[cs]e$", "", text)


def _id_pattern(lic: License) -> str:
    # "cc-by-nc-4.0" also matches "CC BY-NC 4.0"; "llama3.1" also "Llama 3.1".
    parts = re.split(r"[-_]", lic.id)
    body = r"[-_ ]?".join(re.escape(p).replace(r"llama", r"llama[-_ ]?") for p in parts)
    return "|".join([body, *(a for a in lic.aliases)])


_PATTERNS = [
    (lic, re.compile(rf"(?<![\w.])(?:{_id_pattern(lic)})(?![\w]|\.\d)", re.IGNORECASE))
    for lic in LICENSES
]
_MIT_WORD = re.compile(r"\bMIT\b")  # case-sensitive: "mit" is a word in German prose


def lookup(declared: str | None) -> License | None:
    """The licence a declared id names (``"Apache-2.0"``, ``"llama3.1"``, ``"CC BY-NC 4.0"``)."""
    if not declared:
        return None
    key = _key(declared)
    for lic in LICENSES:
        if key in (lic.id, _key(lic.spdx or "")):
            return lic
    for lic, pattern in _PATTERNS:
        if pattern.fullmatch(key) or pattern.fullmatch(declared.strip()):
            return lic
    return None


def split_expression(expression: str | None) -> list[str]:
    """``"llama3 AND cc-by-nc-4.0"`` -> ``["llama3", "cc-by-nc-4.0"]`` (ids normalised)."""
    if not expression:
        return []
    out = []
    for part in re.split(r"\s+AND\s+|\s*\+\s*", expression.strip(), flags=re.IGNORECASE):
        part = part.strip().strip("()")
        if part:
            lic = lookup(part)
            out.append(lic.id if lic else part.lower())
    return list(dict.fromkeys(out))


def identify_text(text: str) -> License | None:
    """The licence whose text ``text`` is (or quotes), by its fingerprint phrases."""
    upper = " ".join(text.split()).upper()
    upper = upper.replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"')
    for lic in LICENSES:
        if any(all(p in upper for p in alt) for alt in lic.fingerprints):
            return lic
    return None


def mentioned(prose: str) -> list[License]:
    """Licences named in prose, in order of first mention."""
    found: list[tuple[int, License]] = []
    for lic, pattern in _PATTERNS:
        if lic.id != "mit" and (m := pattern.search(prose)):
            found.append((m.start(), lic))
    if m := _MIT_WORD.search(prose):
        found.append((m.start(), BY_ID["mit"]))
    return [lic for _, lic in sorted(found, key=lambda x: x[0])]


@dataclass
class Terms:
    """The licence terms an entry carries, with the reasons.

    ``ids[0]`` is the licence of the weights; later ids are terms added by training data
    or merged parents (the SPDX-style expression joins them with ``AND``).
    """

    ids: list[str] = field(default_factory=list)
    source: str = "unknown"
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def expression(self) -> str | None:
        return " AND ".join(self.ids) or None

    @property
    def licenses(self) -> list[License | None]:
        return [BY_ID.get(i) for i in self.ids]

    @property
    def commercial(self) -> bool | None:
        """False when any term forbids commercial use; None when any term is unknown."""
        lics = self.licenses
        if any(lic is not None and not lic.commercial for lic in lics):
            return False
        if not lics or any(lic is None for lic in lics):
            return None
        return True

    @property
    def obligations(self) -> list[str]:
        out: list[str] = []
        for lic in self.licenses:
            if lic is None:
                continue
            if not lic.permissive or lic.attribution:
                out.append(f"include a copy of the {lic.name} ({lic.url})")
            if lic.attribution:
                out.append(lic.attribution)
            if lic.name_prefix:
                out.append(f"begin the model's name with {lic.name_prefix[1]} ({lic.name})")
            if lic.use_policy:
                out.append(f"pass on and follow {lic.use_policy}")
            if not lic.commercial:
                out.append(f"no commercial use ({lic.name})")
            if lic.share_alike:
                out.append(f"distribute derivatives under the {lic.name} only")
            if lic.user_limit:
                out.append(lic.user_limit)
        return list(dict.fromkeys(out))


def conflict(a: License, b: License) -> str | None:
    """Why the terms of ``a`` and ``b`` cannot both apply to one model, or None."""
    if a.id == b.id or (a.family is not None and a.family == b.family):
        return None
    if b.id in SHARE_ALIKE_TARGETS.get(a.id, ()) or a.id in SHARE_ALIKE_TARGETS.get(b.id, ()):
        return None  # the combination can be licensed under the target licence
    for x, y in ((a, b), (b, a)):
        if not x.derivatives:
            return f"{x.name} permits no derivative works"
        if x.share_alike and not y.permissive and y.id not in SHARE_ALIKE_TARGETS.get(x.id, ()):
            why = "forbids commercial use" if not y.commercial else "adds its own terms"
            return f"{x.name} requires derivatives under {x.name} alone, and {y.name} {why}"
        if x.own_family_only and not y.permissive:
            return (
                f"{x.name} forbids using the model to improve another model family, and "
                f"{y.name} keeps its own terms"
            )
    if a.use_policy and b.use_policy:
        return (
            f"{a.name} and {b.name} each require derivatives to be distributed under their "
            "own agreement and use policy"
        )
    return None


DERIVATIVE_OPERATIONS = {"quantize", "finetune", "merge", "adapter", "distill", "dpo", "prune"}


def derive(
    operation: str,
    name: str,
    parents: list[tuple[str, Terms]],
    data: list[tuple[str, list[str]]],
    explicit: list[str] | None = None,
    *,
    force: bool = False,
) -> Terms:
    """The terms of a model made by ``operation`` from ``parents`` and training ``data``.

    Args:
        operation: ``import``, ``quantize``, ``finetune``, ``merge``, ...
        name: the new entry's name (checked against naming clauses).
        parents: (parent name, its terms).
        data: (data file name, licence ids of the data set) for every data file used.
        explicit: licence ids the caller declares for the new model (``--license``).
        force: record the model even when licences conflict (the reasons are kept).

    Raises:
        LicenseConflict: two parents' licences conflict, or a parent permits no
            derivatives, and ``force`` is False.
    """
    terms = Terms()
    inherited: list[str] = []
    for parent, t in parents:
        if not t.ids:
            terms.warnings.append(f"the licence of parent {parent} is unknown")
        for i in t.ids:
            if i not in inherited:
                inherited.append(i)
                terms.notes.append(f"{i}: inherited from {parent}")
    problems = []
    for n, (pa, ta) in enumerate(parents):
        for pb, tb in parents[n + 1 :]:
            for la in filter(None, ta.licenses):
                for lb in filter(None, tb.licenses):
                    if why := conflict(la, lb):
                        problems.append(f"{pa} ({la.id}) and {pb} ({lb.id}): {why}")
    if operation != "import":
        for parent, t in parents:
            for lic in filter(None, t.licenses):
                if not lic.derivatives:
                    problems.append(f"{parent} is under {lic.name}, which permits no derivatives")
    if problems:
        if not force:
            raise LicenseConflict(
                f"licences conflict: {problems[0]} (pass force=True to record it anyway)"
            )
        terms.warnings.extend(f"forced despite a licence conflict: {p}" for p in problems)
    if explicit:
        restrictive = [BY_ID[i] for i in inherited if i in BY_ID and not BY_ID[i].permissive]
        if restrictive:
            kept = ", ".join(lic.id for lic in restrictive)
            terms.warnings.append(f"the parents' terms ({kept}) still apply beside {explicit}")
            terms.ids = list(dict.fromkeys([*inherited, *explicit]))
        else:
            terms.ids = list(dict.fromkeys(explicit))
            if inherited:
                terms.notes.append(f"relicensed as {' AND '.join(explicit)} (parents permissive)")
    else:
        terms.ids = inherited
    for file_name, ids in data:
        if not ids:
            terms.warnings.append(
                f"the licence of data file {file_name} is unknown: pass it with "
                "DataFile(path, license=...) or add a SOURCE.md/README.md beside the data"
            )
        for lic in filter(None, (BY_ID.get(i) for i in ids)):
            if not lic.commercial:
                if lic.id not in terms.ids:
                    terms.ids.append(lic.id)
                terms.notes.append(
                    f"non-commercial: training data {file_name} is licensed {lic.name}"
                )
            elif lic.share_alike:
                terms.warnings.append(
                    f"training data {file_name} is {lic.name} (share-alike); whether that "
                    "reaches the weights is disputed: check before distributing"
                )
            if not lic.derivatives:
                terms.warnings.append(f"training data {file_name} is {lic.name} (no derivatives)")
    terms.warnings.extend(check_name(name, terms.ids, operation))
    return terms


def check_name(name: str, ids: list[str], operation: str) -> list[str]:
    """Warnings for naming clauses a derivative's ``name`` does not meet."""
    if operation not in DERIVATIVE_OPERATIONS:
        return []
    out = []
    for lic in filter(None, (BY_ID.get(i) for i in ids)):
        if lic.name_prefix and not re.match(lic.name_prefix[0], name, re.IGNORECASE):
            regex, required, example = lic.name_prefix
            out.append(
                f"{lic.name}: a model made from it must have {required} at the beginning of "
                f"its name; '{name}' does not (e.g. {example}{name})"
            )
    return out
