"""Where a request's time goes, from the ingress's timeline log lines (`deployments/timeline.py`): per kind of reply
(text, spoken), the median time of each event after the request arrived and the median step from the event
before it on the critical path; and how long the first text took from the thinker to the ingress.

    python -m bench.timeline_medians /tmp/ray/session_.../logs/serve     # the session of a bench_serve run
    python -m bench.timeline_medians SESSION --turns 10 --skip 2 --every 2   # per turn, a bench_realtime run

The first reply of each kind is left out (the first call through each handle sets up its router). With `--turns`,
the realtime responses' timelines (`resp_…`), in the order they ended, after the first `--skip` (bench_realtime's
warm-up session and its replay), are sessions of that many turns one after another, of which the first of each
`--every` in a row is taken (bench_realtime replays each session on one prefilled afresh): per turn, the median of
a few steps.
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
# per turn of a realtime session: (column, from event, to event)
TURN_STEPS = [("arrival → prepared", None, "ingress.prepared"),
              ("thinker submitted → admitted", "thinker.submitted", "thinker.admitted"),
              ("talker submitted → admitted", "talker.submitted", "talker.admitted"),
              ("arrival → first audio", None, "ingress.first_audio")]


def timelines(folder: Path, kind: str = "chatcmpl-") -> list[dict[str, float]]:
    """Every timeline logged by an ingress replica under `folder` for request ids starting with `kind`: event → ms
    after arrival."""
    rows = []
    for log in sorted(folder.glob("replica_*ingress*.log")):
        for line in log.read_text().splitlines():
            if f" timeline {kind}" in line:
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


def per_turn(rows: list[dict[str, float]], turns: int) -> str:
    lines = ["| turn | " + " | ".join(name for name, _, _ in TURN_STEPS) + " | sessions |",
             "|---" * (len(TURN_STEPS) + 2) + "|"]
    for turn in range(turns):
        mine = rows[turn::turns]
        cells = []
        for _, start, end in TURN_STEPS:
            steps = [row[end] - row.get(start, 0.0) for row in mine if end in row and (start is None or start in row)]
            cells.append(f"{statistics.median(steps):.1f}" if steps else "–")
        lines.append(f"| {turn + 1} | " + " | ".join(cells) + f" | {len(mine)} |")
    return "\n".join(lines)


def text_hop(rows: list[dict[str, float]]) -> str:
    """The median time from the thinker sending its first text to the ingress having it: one hop for a text reply,
    three (through the talker and Code2Wav) for a spoken one."""
    hops = [row["ingress.first_text"] - row["thinker.first_out"] for row in rows
            if "ingress.first_text" in row and "thinker.first_out" in row]
    return f"thinker.first_out → ingress.first_text: {statistics.median(hops):.1f} ms" if hops else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="a Ray session's logs/serve folder (or the session folder)")
    p.add_argument("--turns", type=int, help="per turn of realtime sessions of this many turns (ms, medians)")
    p.add_argument("--skip", type=int, default=0, help="with --turns: realtime responses to leave out first")
    p.add_argument("--every", type=int, default=1, help="with --turns: of each this many sessions in a row, the first")
    args = p.parse_args()
    folder = args.folder / "logs" / "serve" if (args.folder / "logs").is_dir() else args.folder
    if args.turns:
        rows = timelines(folder, "resp_")[args.skip:]
        sessions = [rows[i:i + args.turns] for i in range(0, len(rows), args.turns)][::args.every]
        print(per_turn([row for session in sessions for row in session], args.turns))
        return
    rows = timelines(folder)
    for kind, path in PATHS.items():
        mine = [row for row in rows if ("code2wav.called" in row) == (kind == "speech")][1:]
        if mine:
            print(f"\n{kind}\n{table(mine, path)}\n{text_hop(mine)}")


if __name__ == "__main__":
    main()
