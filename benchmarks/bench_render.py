"""Stage 01 speed: frames rendered per second by one worker (one process, one emulator).

    python benchmarks/bench_render.py                 # records a 60 s replay, then times it
    python benchmarks/bench_render.py --seconds 20

Target: >= 1,000 frames/s per worker at 128 px. "emulator only" is the same replay loop without
the resize, the floor that rendering cannot beat.
"""
import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common import load_stage  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="gameplay seconds in the timed replay")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    args = parser.parse_args()
    make_demo, render = load_stage("00_make_demo.py"), load_stage("01_render_frames.py")

    with tempfile.TemporaryDirectory() as tmp:
        job = {"bk2": f"{tmp}/bench.bk2", "seed": 0, "n_steps": int(args.seconds * 60)}
        make_demo.record_repetition(job)
        make_demo._ENV.close()
        make_demo._ENV = None

        def best_rate(fn):
            rates = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                n = fn()
                rates.append(n / (time.perf_counter() - start))
            return max(rates), n

        rows = []
        for resolution in (64, 128):
            rate, n = best_rate(lambda: len(render.replay(job["bk2"], resolution).frames))
            rows.append((f"render {resolution} px", n, rate))
        original_squash = render.squash
        render.squash = lambda screen, resolution: screen[:resolution, :resolution]  # no resize
        rate, n = best_rate(lambda: len(render.replay(job["bk2"], 8).frames))
        render.squash = original_squash
        rows.append(("emulator only", n, rate))

    print(f"# bench_render: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"1 process, best of {args.repeats}")
    print(f"{'case':<16} {'frames':>8} {'frames/s':>10}")
    for name, n, rate in rows:
        print(f"{name:<16} {n:>8} {rate:>10.0f}")
    target = dict((name, rate) for name, _, rate in rows)["render 128 px"]
    print(f"target >= 1000 frames/s per worker at 128 px: {'met' if target >= 1000 else 'NOT met'} ({target:.0f})")


if __name__ == "__main__":
    main()
