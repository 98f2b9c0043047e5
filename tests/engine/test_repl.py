"""``folk chat``'s session: history kept across turns, /reset clears it, /exit quits."""

from __future__ import annotations

import json
import subprocess
import sys

import folklm
from folklm.engine.repl import ChatSession
from folklm.ops.sampling import SamplingParams

TEMPLATE = (
    "{% for m in messages %}t{{ 10 if m['role'] == 'user' else 11 }} {{ m['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}t11{% endif %}"
)


def chat_model(tiny_models, tmp_path):
    _, folder = tiny_models("mistral")
    dst = tmp_path / "chatty"
    dst.mkdir()
    for f in folder.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_session_keeps_history_and_resets(tiny_models, tmp_path):
    llm = folklm.load(chat_model(tiny_models, tmp_path), dtype="float32")
    session = ChatSession(llm, SamplingParams(max_new_tokens=4, ignore_eos=True), system="t20")
    out: list[str] = []
    first = session.ask("t5 t6", out.append)
    assert first and "".join(out) == first
    session.ask("t7", out.append)
    roles = [m["role"] for m in session.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    # the second turn's prompt contained the first answer: same as a one-shot generate
    again = llm.chat(session.messages[:4], max_new_tokens=4, ignore_eos=True)
    assert again.text == session.messages[4]["content"]
    session.reset()
    assert session.messages == [{"role": "system", "content": "t20"}]


def test_repl_over_stdin(tiny_models, tmp_path):
    folder = chat_model(tiny_models, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "folklm.cli.main", "chat", str(folder), "-n", "3"],
        input="t5 t6\n/reset\nt7\n/exit\nt9\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "(conversation cleared)" in proc.stdout
    answers = [line for line in proc.stdout.split(">>> ") if line.strip().startswith("t")]
    assert len(answers) == 2  # t9 came after /exit and was never answered


def test_folk_chat_second_turn_prompt_contains_the_first(tiny_models, tmp_path):
    """Through the real ``folk chat`` process: the second answer is the one the model gives
    with the first exchange in its prompt, which differs from its answer without it (so the
    history demonstrably reached the prompt); after /reset it is the answer without it."""
    folder = chat_model(tiny_models, tmp_path)
    llm = folklm.load(folder, dtype="float32")
    greedy = dict(max_new_tokens=4)  # folk chat's defaults: greedy, stops at EOS

    def answer(*messages: str) -> str:
        turns = [
            {"role": "user" if k % 2 == 0 else "assistant", "content": m}
            for k, m in enumerate(messages)
        ]
        return llm.chat(turns, **greedy).text

    q1 = "t5 t6"
    a1 = answer(q1)
    for q2 in ("t7", "t30", "t41 t42", "t9 t9", "t50", "t63 t3"):
        with_history, alone = answer(q1, a1, q2), answer(q2)
        if with_history != alone:
            break
    else:
        raise AssertionError("no second question whose answer depends on the first turn")
    proc = subprocess.run(
        [sys.executable, "-m", "folklm.cli.main", "chat", str(folder), "-n", "4"]
        + ["--dtype", "float32"],
        input=f"{q1}\n{q2}\n/reset\n{q2}\n/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    turns = proc.stdout.split(">>> ")[1:]  # what was written after each prompt
    assert [t.strip() for t in turns] == [
        a1.strip(),
        with_history.strip(),
        "(conversation cleared)",
        alone.strip(),
        "",
    ], (proc.stdout, a1, with_history, alone)
