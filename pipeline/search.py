"""`knnd search "prompt"`: retrieval only. Prints the neighbours (key, caption, similarity) of a
text prompt from any index directory, encoding the prompt with the CLIP the index was built from."""
from __future__ import annotations

from pathlib import Path

from pipeline.retrieval import Retriever
from pipeline.runner import resolve_device, stage_dir
from pipeline.generation import load_index_clip


def search(index_dir: Path, prompt: str, k: int, device: str = "cpu", where: str | None = None) -> list[dict]:
    """The k nearest indexed images of `prompt` (among those satisfying `where`): [{rank, row, key, caption, similarity}]."""
    retriever = Retriever(index_dir, queries="text")
    bundle = load_index_clip(retriever.infos, retriever.dir, device)
    retriever.check_dim(bundle.embed_dim, f"the CLIP model {bundle.name}")
    return nearest(retriever, bundle, prompt, k, where)


def nearest(retriever: Retriever, bundle, prompt: str, k: int, where: str | None = None) -> list[dict]:
    """search() with the index and its CLIP already loaded (`knnd serve` keeps them)."""
    from model.clip import encode_texts

    sims, rows = retriever.search(encode_texts(bundle, [prompt]), k, where=where)
    hits = [(s, r) for s, r in zip(sims[0], rows[0]) if r >= 0]
    return [{"rank": i + 1, "row": int(r), "key": key, "caption": caption, "similarity": float(s)}
            for i, ((s, r), (key, caption)) in enumerate(zip(hits, retriever.describe([r for _, r in hits])))]


def search_command(cfg, prompt: str, index_dir: str | None = None, k: int = 10, where: str | None = None) -> int:
    index_dir = Path(index_dir) if index_dir else stage_dir(cfg, "index")
    hits = search(index_dir, prompt, k, resolve_device(cfg), where)
    print(f"{len(hits)} nearest images to {prompt!r} in {index_dir}:")
    for h in hits:
        print(f"{h['rank']:>3}  {h['similarity']:.3f}  {h['key']:<12} {h['caption']}")
    return 0
