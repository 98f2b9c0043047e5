"""The local model hub: a content-addressed store of models with their history.

Every model folklm imports or makes (quantize, tune, merge) is one *entry* under
``$FOLK_HOME/hub``: its files are blobs named by their sha256 (a tokenizer shared by ten
derivatives is stored once), and a SQLite catalogue records names and tags (``name:tag``,
as in Ollama), files, lineage edges, licences, recipes and evaluation results.

Modules, from the bottom up:

* :mod:`~folklm.hub.names` -- ``name:tag`` references and their validation;
* :mod:`~folklm.hub.store` -- blobs, the SQLite schema, atomic transactions, entry folders;
* :mod:`~folklm.hub.modelinfo` -- what a folder or GGUF file holds, read without torch;
* :mod:`~folklm.hub.licenses` -- licence detection, propagation and compatibility rules;
* :mod:`~folklm.hub.license_files` -- finding a model's or a data set's licence in its files;
* :mod:`~folklm.hub.catalogue` -- reading entries, their lineage and evaluations back;
* :mod:`~folklm.hub.register` -- ``register_model``, the one writer of entries;
* :mod:`~folklm.hub.maintenance` -- rm, tag, verify, gc, evaluations, the bundled model;
* :mod:`~folklm.hub.api` -- the public functions the CLI, ``folklm.load`` and every
  model-making operation call (``register_model``, ``resolve_model``, ``import_path``, ...);
* :mod:`~folklm.hub.card`, :mod:`~folklm.hub.transparency` -- model cards and
  transparency reports (exporting files is an operation: :mod:`folklm.export`);
* :mod:`~folklm.hub.resolve` -- the one resolver: a name, a path or nothing -> files;
* :mod:`~folklm.hub.derive` -- the derivation context every model-making operation uses;
* :mod:`~folklm.hub.defaults` -- the bundled default model (converted once, registered);
* :mod:`~folklm.hub.ollama` -- Ollama names, manifests and layers (no network);
* :mod:`~folklm.hub.sources` -- imports from the Hugging Face cache and an Ollama store,
  files linked instead of copied, each checked against the hash it is named by;
* :mod:`~folklm.hub.pull` -- ``folk pull``: the Hugging Face Hub (``huggingface_hub``) and
  Ollama registries.

The hub runs no model and imports no operation; nothing here imports torch except the
first conversion of the default model, so catalogue commands start fast.
"""
