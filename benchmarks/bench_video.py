"""Stage 01 on videos: frames decoded and squashed per second by one worker (one process, one
decoding thread), on a video like CNeuroMod's Friends chunks (720 x 480 H.264 at 29.97 fps, encoded
by libx264 at 5,000 kbit/s: the `b=5000k` of the cut scripts in courtois-neuromod/friends.stimuli).

    python benchmarks/bench_video.py                  # writes a 30 s video, then times it
    python benchmarks/bench_video.py --seconds 60 --bitrate 5000000

Target: >= 1,000 video frames/s per worker at 128 px. "decode only" is the floor that 01 cannot
beat; "decode + RGB" adds the conversion every frame needs before it is squashed; "decode, N thr"
is one stream decoded by FFmpeg's frame threads on all N CPUs of the job (01 uses one per worker
instead). H.264 decoding time grows with the bitrate (--bitrate 1500000 for a lighter stream).
The last lines say what 01 on a full Friends season (about 24 episodes of 22 minutes, 29.97 fps)
takes per worker and writes (60 Hz frames, uint8).
"""
import argparse
import platform
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import common  # noqa: E402
SEASON_S = 24 * 22 * 60


def write_sitcom_like(path, seconds, bitrate):
    """A 720 x 480 yuv420p H.264 video at 29.97 fps: a textured set, people-sized blobs that move,
    a cut every 4 s (a stand-in for a sitcom's statistics, at Friends' bitrate)."""
    import av

    rng = np.random.default_rng(0)
    height, width, n = 480, 720, int(seconds * 30000 / 1001)
    y, x = np.mgrid[:height, :width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(30000, 1001))
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        stream.bit_rate = bitrate
        for j in range(n):
            if j % 120 == 0:   # a cut: a new set
                texture = np.sin(x / rng.uniform(5, 40)) * np.cos(y / rng.uniform(5, 40))
                base = rng.uniform(40, 200, 3) * (0.8 + 0.2 * texture[..., None])
                centres = rng.uniform([0, 0], [width, height], (3, 2))
            frame = base.copy()
            for k, (cx, cy) in enumerate(centres):
                cx, cy = cx + 3 * np.sin(j / 15 + k), cy + 2 * np.cos(j / 20 + k)
                frame[(x - cx) ** 2 / 60 ** 2 + (y - cy) ** 2 / 120 ** 2 < 1] = 230 - 60 * k
            noisy = frame + rng.normal(0, 3, frame.shape)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(
                np.clip(noisy, 0, 255).astype(np.uint8), format="rgb24")))
        container.mux(stream.encode())
    return n


def rate(fn, repeats):
    """Best frames/s of `repeats` runs of fn() (which returns the frames it handled)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - start))
    return best


def decode_loop(path, convert, threads=1):
    import video_frames

    container, stream = video_frames.open_video(path)
    if threads > 1:   # FFmpeg's frame threads: what one stream gets from several CPUs
        stream.codec_context.thread_count, stream.codec_context.thread_type = threads, "FRAME"
    with container:
        n = 0
        for frame in container.decode(stream):
            if convert:
                frame.to_ndarray(format="rgb24")
            n += 1
    return n


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the timed video")
    parser.add_argument("--bitrate", type=int, default=5_000_000,
                        help="H.264 bits/s (default: the Friends chunks' 5M)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    args = parser.parse_args()
    import video_frames
    render = common.load_stage("01_render_frames.py")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sitcom.mkv"
        n = write_sitcom_like(path, args.seconds, args.bitrate)
        rows = [("decode only", rate(lambda: decode_loop(path, False), args.repeats)),
                ("decode + RGB", rate(lambda: decode_loop(path, True), args.repeats))]
        threads = common.available_cpus()
        if threads > 1:
            rows.append((f"decode, {threads} thr", rate(
                lambda: decode_loop(path, False, threads), args.repeats)))
        for resolution in (64, 128):
            decode = video_frames.decode_on_timeline
            rows.append((f"01, {resolution} px", rate(
                lambda: decode(path, resolution, render.squash)[1].n_frames, args.repeats)))
    print(f"# bench_video: {platform.processor() or platform.machine()}, python "
          f"{platform.python_version()}, 1 process, 1 decoding thread (but 'thr'), "
          f"best of {args.repeats}; {n} frames of 720 x 480 H.264 at 29.97 fps, "
          f"{args.bitrate / 1e6:g} Mbit/s")
    print(f"{'case':<16} {'frames/s':>10}")
    for name, frames_per_s in rows:
        print(f"{name:<16} {frames_per_s:>10.0f}")
    at_128 = dict(rows)["01, 128 px"]
    print(f"target >= 1000 frames/s per worker at 128 px: "
          f"{'met' if at_128 >= 1000 else 'NOT met'} ({at_128:.0f})")
    season_frames = SEASON_S * 30000 / 1001
    print(f"a Friends season (~{SEASON_S / 3600:.1f} h, {season_frames / 1e6:.2f} M frames): "
          f"{season_frames / at_128 / 3600:.2f} h for one worker at 128 px, "
          f"{SEASON_S * 60 * 128 * 128 * 3 / 1e9:.0f} GB of 60 Hz frames "
          f"({SEASON_S * 60 * 64 * 64 * 3 / 1e9:.0f} GB at 64 px)")


if __name__ == "__main__":
    main()
