"""Where a request's time goes, from the ingress's timeline log lines (`deployments/timeline.py`): per kind of reply
(text, spoken), the median time of each event after the request arrived and the median step from the event
before it on the critical path.

    python -m bench.timeline_medians /tmp/ray/session_.../logs/serve     # the session of a bench_serve run

The first reply of each kind is left out (the first call through each handle sets up its router).
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

# the events on the way to the first text (text reply) or the first audio (spoken reply), in order
PATHS = {
    "text": ["ingress.prepared", "thinker.called", "thinker.submitted", "thinker.admitted", "thinker.first_out",
             "ingress.first_text", "thinker.done", "ingress.done"],
    "speech": ["ingress.prepared", "code2wav.called", "talker.called", "thinker.called", "thinker.submitted",
               "thinker.admitted", "thinker.first_out", "talker.input", "talker.submitted", "talker.admitted",
               "talker.first_out", "code2wav.first_frames", "code2wav.first_out", "ingress.first_audio",
               "thinker.done", "talker.done", "ingress.done"],
}
EVENT = re.compile(r"([\d.]+) (\w+\.\w+)")


def timelines(folder: Path) -> list[dict[str, float]]:
    """Every timeline logged by an ingress replica under `folder`: event → ms after arrival."""
    rows = []
    for log in sorted(folder.glob("replica_*ingress*.log")):
        for line in log.read_text().splitlines():
            if " timeline chatcmpl-" in line:
                story = line.split("(ms after arrival): ", 1)[1]
                rows.append({event: float(ms) for ms, event in EVENT.findall(story)})
    return rows


def table(rows: list[dict[str, float]], path: list[str]) -> str:
    lines = [f"| event | ms after arrival | step from the event before | ({len(rows)} replies) |", "|---|---|---|---|"]
    for before, event in zip([None, *path], path):
        at = [row[event] for row in rows if event in row]
        steps = [row[event] - row[before] for row in rows if before in row and event in row]
        step = f"{statistics.median(steps):.1f}" if steps else ""
        lines.append(f"| {event} | {statistics.median(at):.1f} | {step} | |" if at else f"| {event} | – | | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="a Ray session's logs/serve folder (or the session folder)")
    args = p.parse_args()
    folder = args.folder / "logs" / "serve" if (args.folder / "logs").is_dir() else args.folder
    rows = timelines(folder)
    for kind, path in PATHS.items():
        mine = [row for row in rows if ("code2wav.called" in row) == (kind == "speech")][1:]
        if mine:
            print(f"\n{kind}\n{table(mine, path)}")


if __name__ == "__main__":
    main()
