"""The README.md model card written beside an exported model.

What a person deciding whether to use the model asks: what it started from, what data and
parameters trained it, how much it improved (before/after and per epoch), and how to load
it in open_clip, upload it to the Hugging Face Hub and serve it from Marqo.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from .run_files import RunFiles


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return "`" + json.dumps(value) + "`"
    return "" if value is None else str(value).replace("|", "\\|")


def _data_section(params: dict[str, Any], data: dict[str, Any]) -> str:
    rows = [["train", params.get("trainData"), data.get("trainRows")], *_eval_data_rows(params, data)]
    fields = [[side, k, w] for side in ("left", "right")
              for k, w in zip(params.get(f"{side}Keys") or [], params.get(f"{side}Weights") or [])]
    return "\n\n".join([
        _table(["split", "location", "rows"], rows),
        _table(["side", "field", "weight"], fields),
        f"Row weight (graded relevance) column: `{params.get('weightKey')}`. Each side's embedding is the "
        "weighted mean of its fields' L2-normalised embeddings, normalised again; the first right field "
        "is the image.",
    ])


def _eval_data_rows(params: dict[str, Any], data: dict[str, Any]) -> list[list[Any]]:
    """The data table's rows of the eval files and corpora: evalData's, or each eval set's."""
    if not params.get("evalSets"):
        rows = [["eval", params.get("evalData"), data.get("evalRows")]]
        if params.get("corpusData"):
            rows.append(["corpus (eval candidates)", params.get("corpusData"), data.get("corpusRows")])
        return rows
    counts = data.get("evalSets") or {}
    rows = []
    for s in params["evalSets"]:
        n = counts.get(s["name"]) or {}
        rows.append([f"eval set {s['name']}", s["data"], n.get("evalRows")])
        if s.get("corpus"):
            rows.append([f"eval set {s['name']} corpus", s["corpus"], n.get("corpusRows")])
    return rows


def _evaluation_section(run: Optional[RunFiles]) -> str:
    """One table, or one per eval set with several (the first selects the best checkpoint)."""
    names = run.eval_set_names() if run else []
    if len(names) <= 1:
        header, rows = run.eval_table() if run else ([], [])
        return _table(header, rows) if rows else "No evaluation data was given."
    parts = [f"Evaluated on {len(names)} eval sets each time; the first, `{names[0]}`, selects the best "
             "checkpoint (its nDCG@10)."]
    parts += [f"### {name}\n\n" + _table(*run.eval_table(name)) for name in names]
    return "\n\n".join(parts)


def _usage(config: dict[str, Any], name: str) -> str:
    dim = config["model_cfg"].get("embed_dim")
    marqo = {
        "model": name,
        "modelProperties": {"name": f"hf-hub:YOUR_ORG/{name}", "dimensions": dim, "type": "open_clip"},
        "normalizeEmbeddings": True,
        "treatUrlsAndPointersAsImages": True,
    }
    return f"""```python
import open_clip, torch
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH/TO/THIS/FOLDER")
tokenizer = open_clip.get_tokenizer("local-dir:PATH/TO/THIS/FOLDER")
model.eval()
with torch.no_grad():
    text = model.encode_text(tokenizer(["a red mug"]), normalize=True)
```

Upload to the Hugging Face Hub (then load it with `"hf-hub:YOUR_ORG/{name}"`):

```python
from huggingface_hub import upload_folder
upload_folder(repo_id="YOUR_ORG/{name}", folder_path="PATH/TO/THIS/FOLDER")
```

Serve it from Marqo (index settings for a custom open_clip model, loaded from the Hub):

```json
{json.dumps(marqo, indent=2)}
```

Documents with several fields (image + title) match training when indexed as a Marqo
`multimodal_combination` field with the right-side weights above; queries with the left ones."""


def _matryoshka_note(dims: list[int], full: Optional[int]) -> str:
    widths = ", ".join(str(d) for d in dims)
    return (f"Note: trained with Matryoshka widths {widths} besides the full {full}: the first d "
            "coordinates of an embedding, renormalised, are an embedding of width d (the evaluation "
            "above reports `<metric>@dim<d>` for each). Cut and renormalise both queries and documents "
            "alike: `torch.nn.functional.normalize(e[:, :d], dim=-1)`.")


def model_card(config: dict[str, Any], run: Optional[RunFiles], *, checkpoint: str,
               epoch: Optional[int] = None) -> str:
    summary = (run.summary if run else None) or {}
    start = run.start if run else {}
    params = summary.get("parameters") or start.get("parameters") or {}
    name = summary.get("name") or start.get("name") or "kontrast-model"
    base = params.get("model") or summary.get("model") or "?"
    pretrained = params.get("pretrained") or "random initialisation"
    parts = [
        f"---\nlibrary_name: open_clip\ntags: [clip, kontrast, retrieval]\n---\n\n# {name}",
        f"Fine-tuned with kontrast from `{base}` ({pretrained}). Exported from `{checkpoint}` "
        f"(epoch {epoch}).",
        "## Data\n\n" + _data_section(params, start.get("rows") or {}),
        "## Evaluation\n\n" + _evaluation_section(run),
        "## Training parameters\n\n" + _table(["parameter", "value"], [[k, v] for k, v in sorted(params.items())]),
        "## Resolved by the trainer\n\n" + _table(
            ["value", "resolved"], [[k, v] for k, v in sorted((summary.get("resolved") or {}).items())]),
        "## Use\n\n" + _usage(config, name),
    ]
    fed = config["preprocess_cfg"].get("context_length")
    if fed and fed < (config["model_cfg"].get("text_cfg") or {}).get("context_length", fed):
        parts.append(f"Note: training fed at most {fed} tokens per text to a tower with more positions; "
                     f"truncate texts to {fed} tokens to match it exactly (open_clip's tokenizer pads to the "
                     "tower's full length).")
    if params.get("matryoshkaDims"):
        parts.append(_matryoshka_note(params["matryoshkaDims"], config["model_cfg"].get("embed_dim")))
    if params.get("frozenRight"):
        parts.append("Note: trained with `frozenRight`, so documents must be encoded with the starting "
                     "model; this folder's image tower is the unchanged starting one only if the image "
                     "tower was locked.")
    if (config["model_cfg"].get("text_cfg") or {}).get("hf_pooler_type") == "max_pooler":
        parts.append("Note: open_clip 3.3.0's `max_pooler` masks the wrong tokens; kontrast trained with a "
                     "corrected max pooler, so load it with an open_clip whose MaxPooler is fixed, or swap "
                     "in kontrast's `MaskedMaxPooler`.")
    return "\n\n".join(parts) + "\n"
