"""The one table of `experiments/gpu_check.sh`: read its logs and its search folder, print what was measured.

    python experiments/gpu_table.py experiments/gpu_check_out
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def stage(out: Path, name: str) -> tuple[str, str]:
    """(log text, 'exit X after Ys') of one stage of gpu_check.sh."""
    log = (out / f"{name}.log").read_text(errors="replace") if (out / f"{name}.log").is_file() else ""
    status = (out / f"{name}.status").read_text().split() if (out / f"{name}.status").is_file() else ["?", "?"]
    return log, f"exit {status[0]} after {status[1]}s"


def found(pattern: str, text: str, default: str = "not measured") -> str:
    match = re.search(pattern, text, re.MULTILINE)
    return match.group(1).strip() if match else default


def search_rows(out: Path) -> tuple[dict, list[dict]]:
    folder = out / "results" / "gpu-check"
    card_path = folder / "best_model" / "model_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    if not (folder / "best_model").is_dir():
        return card, []
    from raylocal.results import all_reports, read_search

    return card, all_reports(read_search(folder)).to_dict("records")


def search_throughput(card: dict, rows: list[dict]) -> str:
    """Canvases trained by all trials over the time from the first trial's start to the last one's end."""
    if not rows or not card:
        return "not measured"
    per_epoch = card["data"]["train_canvases_per_epoch"]
    last_epoch: dict[str, float] = {}
    for row in rows:
        last_epoch[row["trial_id"]] = max(last_epoch.get(row["trial_id"], 0.0), row["epoch"])
    trained = sum(last_epoch.values()) * per_epoch
    span = max(row["timestamp"] for row in rows) - min(row["timestamp"] - row["time_total_s"] for row in rows)
    alone = sorted(row["train_images_per_s"] for row in rows)
    return (f"{trained / span:,.0f} canvases/s over {span:.0f}s ({trained:,.0f} canvases, {len(last_epoch)} trials); "
            f"per trial while training: median {alone[len(alone) // 2]:,.0f}")


def main(out: Path) -> None:
    gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").is_file() else "?"
    tests, tests_status = stage(out, "tests")
    bench, bench_status = stage(out, "bench_train")
    search, search_status = stage(out, "search")
    card, rows = search_rows(out)
    final_log, final_status = stage(out, "final")
    final_card_path = out / "results" / "gpu-final" / "best_model" / "model_card.json"
    final_card = json.loads(final_card_path.read_text()) if final_card_path.is_file() else {}
    final_test = final_card.get("test", {})
    concurrent = re.findall(r"concurrent trainers on one GPU: +(\d+) -> +(\d+) canvases/s in all, +(\d+) each", bench)
    test = card.get("test", {})
    table = [
        ("GPU", gpu),
        ("gpu tests", found(r"^=* ?(\d+ (?:passed|failed).*?) ?=*$", tests) + f" ({tests_status})"),
        ("plain PyTorch loop, channels-last", found(r"plain PyTorch loop \(channels-last\) +(\d+ canvases/s)", bench)),
        ("plain PyTorch loop, default format", found(r"plain PyTorch loop \(default\) +(\d+ canvases/s)", bench)),
        ("raylocal loop, no Ray", found(r"raylocal loop, no Ray +(\d+ canvases/s)", bench)),
        ("raylocal loop in Ray Train", found(r"raylocal loop in Ray Train +(\d+ canvases/s)", bench)),
        ("ratio Ray Train / plain (target >= 0.95)", found(r"ratio Ray Train loop / faster plain loop: (.*)", bench)),
        ("ratio raylocal no Ray / plain", found(r"ratio raylocal loop without Ray / faster plain loop: (.*)", bench)),
        ("torch.compile", found(r"torch.compile: (.*)", bench)),
        *[(f"evaluation batch {size}", time) for size, time in
          re.findall(r"evaluation batch +(\d+): +(.*)", bench)],
        *[(f"{k} trainers sharing the GPU", f"{int(total):,} canvases/s in all, {int(each):,} each")
          for k, total, each in concurrent],
        ("bench_train", bench_status),
        ("default search --trials 50, whole command", f"{search_status} (target <= 180s)"),
        ("  test accuracy (target >= 0.993)", f"{test['test_accuracy']:.4f}" if test else "not measured"),
        ("  test mean IoU (target >= 0.93)", f"{test['test_mean_iou']:.4f}" if test else "not measured"),
        ("  test det IoU", f"{test['test_det_iou']:.4f}" if test else "not measured"),
        ("  layout", found(r"^(layout: .*)", search)),
        ("  search training throughput", search_throughput(card, rows)),
        ("  best trial", f"{card.get('trial_id')} epoch {card.get('epoch')}: {card.get('hyperparameters')}"
         if card else "not measured"),
        ("default command with a 10-epoch final phase", final_status),
        ("  final plan", found(r"^(final: \d+ configuration.*)", final_log)),
        ("  test accuracy / mean IoU / det IoU",
         " / ".join(f"{final_test[f'test_{m}']:.4f}" for m in ("accuracy", "mean_iou", "det_iou"))
         if final_test else "not measured"),
    ]
    width = max(len(name) for name, _ in table)
    print("\n# gpu_check")
    for name, value in table:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/gpu_check_out"))
