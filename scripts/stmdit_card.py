"""Write an STMDiT checkpoint's card blocks from its evaluation, autoencoder and training record.

    python scripts/stmdit_card.py CKPT --eval EVAL.json [--eval-unguided EVAL0.json]
        --eval-command "stgen evaluate stmdit ..." [--guide GUIDE.safetensors --guide-command
        "stgen train genst ..."] [--ae AE2.safetensors] [--realism docs/stmdit_realism.json]
        [--bench BENCH.json] [--name stmdit_default]

Re-saves CKPT (same tensors, atomically) with:
- ``figures``: ``evaluate_stmdit.card_figures`` of EVAL (and of EVAL0 under
  ``without_expression_guidance``), so the card's figures are what ``stgen evaluate stmdit``
  prints for this checkpoint;
- ``evaluation``: the command, the full results, the guide's command and checksum;
- ``autoencoder``: the v2 autoencoder's training record (steps, wall time, sections, command)
  and its held-out reconstruction figures from the realism JSON;
- ``training``: where and how long the DiT trained (from its loss history).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from napari_stgen.models.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from napari_stgen.training.evaluate_stmdit import card_figures


def _ae_record(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    keep = ("step", "steps", "wall_s", "sections", "device", "command", "intermediate", "train")
    rec = {k: meta[k] for k in keep if k in meta}
    rec["config"] = meta.get("ae_config")
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--eval", required=True)
    ap.add_argument("--eval-unguided", default=None)
    ap.add_argument("--eval-command", required=True)
    ap.add_argument("--guide", default=None)
    ap.add_argument("--guide-command", default="")
    ap.add_argument("--ae", default=None, help="the v2 autoencoder weights the DiT was trained on")
    ap.add_argument("--realism", default=None, help="scripts/stmdit_realism.py JSON")
    ap.add_argument("--bench", default=None, help="benchmarks/bench_synthesize.py JSON")
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)

    tensors, card = load_checkpoint(args.ckpt, "stmdit")
    res = json.loads(Path(args.eval).read_text())
    if res["model"]["weights_sha256"] != card["weights_sha256"]:
        raise SystemExit(f"{args.eval} evaluated other weights than {args.ckpt}")
    fig = card_figures(res)
    ev: dict = {
        "command": args.eval_command,
        "machine": f"{platform.machine()} CPU",
        "reproduce": "the same command on this checkpoint prints `result` (seeded sampling; "
        "CPU float32 results can differ in the last digits across machines)",
        "result": res,
    }
    if args.eval_unguided:
        r0 = json.loads(Path(args.eval_unguided).read_text())
        fig["without_expression_guidance"] = card_figures(r0)
        ev["result_without_expression_guidance"] = r0
    if args.guide:
        _, gcard = load_checkpoint(args.guide, "genst")
        ev["guide_model"] = {
            "file": Path(args.guide).name,
            "sha256": sha256_file(args.guide),
            "sections": gcard.get("data", {}).get("sections"),
            "command": args.guide_command or gcard.get("command", ""),
        }
    if args.bench:
        ev["bench_synthesize"] = json.loads(Path(args.bench).read_text())
    card["figures"] = fig
    card["evaluation"] = ev
    if args.ae:
        ae = {**card.get("autoencoder", {}), **_ae_record(args.ae)}
        if args.realism:
            rj = json.loads(Path(args.realism).read_text()).get("ae_v2", {})
            ae["held_out_reconstruction"] = {
                k: rj[k] for k in ("at_0.875_vs_real", "at_0.875_um_px") if k in rj
            }
        card["autoencoder"] = ae
        dit_secs = ", ".join(card["data"]["sections"])
        ae_secs = ", ".join(ae.get("sections") or [])
        card.setdefault("data", {})["note"] = (
            f"DiT: measured spots and GenST pseudo-labels of {dit_secs}; "
            f"tile autoencoder: image crops of {ae_secs} (no expression)"
        )
    hist = card.get("loss_history", [])
    card["training"] = {
        "where": f"{platform.machine()} CPU, {card['train']['threads']} torch thread(s); "
        "no GPU was lent to this task"
        if card.get("train_device", "cpu") == "cpu"
        else f"{card['train_device']} (bf16 autocast)",
        "steps": card["train"]["steps"],
        "seconds": hist[-1][2] if hist else None,
    }
    if args.name:
        card["name"] = args.name
    save_checkpoint(args.ckpt, tensors, card)
    print(json.dumps(fig, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
