"""Video stimuli (CNeuroMod Friends, movie10, the Algonauts 2025 release): decode a video file with
PyAV and place its frames on the run's 60 Hz timeline, the clock a replay's frames already run on.

Frame j of a video is shown from its presentation time t_j = j / fps seconds after the video
starts until t_(j+1) (the last frame for one frame duration). The file's own times,
(pts_j - pts_0) x time_base, must agree (within a quarter of a frame: containers round them,
Matroska to the millisecond, which would otherwise move a frame that starts on a tick by one tick).
01 stores the frame shown at each 1/60 s tick from the video's start: tick k holds frame j when
t_j <= k / 60 < t_(j+1), so a 29.97 fps frame fills 2 ticks, now and then 3 (docs/CONTRACT.md, "Time
conventions"). Every stage after 01 then reads movies and replays alike: a clip at 15 Hz is every
4th tick, the frame shown at that time.

Only constant frame rates are read: a frame whose presentation time strays from j / fps by more
than a quarter of a frame (a dropped or repeated frame, a variable rate) is an InputError, as are an
unreadable, empty or truncated file and an unknown codec. Each frame is decoded in one thread
(01 runs one worker per CPU) and squashed by the caller's function, the game's.
"""
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

import common
from paper.alignment import GAMEPLAY_HZ
from common import InputError

VIDEO_SUFFIXES = (".mkv", ".mp4", ".mov", ".avi", ".webm")
# A frame may stray this far (in frames) from j / fps: containers round presentation times (the
# Matroska default is to the millisecond, 0.03 frame at 30 fps); a dropped frame strays by 1.
RATE_TOLERANCE_FRAMES = 0.25
# A header that says the video lasts longer than its frames by more than this: a truncated file
# (the container's duration covers every stream, and audio may outlast the video a little).
TRUNCATION_TOLERANCE_S = 0.5


def is_video(path):
    return Path(str(path)).suffix.lower() in VIDEO_SUFFIXES


@dataclass
class VideoTimeline:
    """Where a video's frames go on the 60 Hz timeline: frame j fills ticks
    first_ticks[j] ... first_ticks[j + 1] - 1 (none when they are equal, above 60 fps)."""
    fps: Fraction            # the stream's frame rate (30000/1001 for NTSC video)
    first_ticks: np.ndarray  # int64 (n_frames + 1,); the last is the number of ticks, n_ticks
    width: int
    height: int
    codec: str

    @property
    def n_frames(self):
        return len(self.first_ticks) - 1

    @property
    def n_ticks(self):
        return int(self.first_ticks[-1])

    @property
    def duration_s(self):
        return self.n_frames / float(self.fps)


def open_video(path):
    """(container, its first video stream) of a readable video; InputError naming the file
    otherwise (missing, empty, not a video, no video stream, a codec this FFmpeg cannot decode)."""
    import av   # imported here: the stages without movies do without it

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes), not a video")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as err:
        raise InputError(f"{path}: not a readable video ({err.strerror or err})") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{path}: no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        container.close()
        raise InputError(f"{path}: unknown video codec: the FFmpeg in PyAV has no decoder for it")
    stream.codec_context.thread_count = 1   # one worker per CPU: no threads of its own
    return container, stream


def read_timeline(path):
    """The VideoTimeline of a video, from its packets' presentation times (no frame is decoded):
    InputError for an unreadable, empty, truncated or variable-rate video."""
    import av

    container, stream = open_video(path)
    with container:
        try:
            pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None)
        except av.error.FFmpegError as err:
            raise InputError(f"{path}: damaged video ({err.strerror or err})") from None
        fps = stream.average_rate or stream.guessed_rate
        header_s = container.duration / 1e6 if container.duration else None
        width, height, codec = stream.width, stream.height, stream.codec_context.name
        time_base = stream.time_base
    if not pts:
        raise InputError(f"{path}: the video stream holds no frame")
    if not fps or not time_base:
        raise InputError(f"{path}: the video stream has no frame rate or time base")
    timeline = VideoTimeline(Fraction(fps), first_ticks(len(pts), Fraction(fps)), width, height,
                             codec)
    check_constant_rate(path, pts, time_base, timeline.fps)
    if header_s is not None and header_s > timeline.duration_s + TRUNCATION_TOLERANCE_S:
        raise InputError(f"{path}: truncated: its header says {header_s:.2f} s, its frames last "
                         f"{timeline.duration_s:.2f} s ({timeline.n_frames} at "
                         f"{float(timeline.fps):.3f} fps)")
    return timeline


def first_ticks(n_frames, fps):
    """int64 (n_frames + 1,): the first 60 Hz tick at or after each frame's presentation time,
    ceil(j x 60 / fps), then the tick where the last frame ends, ceil(n_frames x 60 / fps), in exact
    integer arithmetic (fps a Fraction)."""
    numerator = np.arange(n_frames + 1, dtype=np.int64) * (GAMEPLAY_HZ * fps.denominator)
    return -(-numerator // fps.numerator)                                 # ceil, exactly


def check_constant_rate(path, pts, time_base, fps):
    """InputError when frame j is not shown at j / fps (within RATE_TOLERANCE_FRAMES): a variable
    frame rate, a dropped or repeated frame."""
    seconds = (np.asarray(pts, np.float64) - pts[0]) * float(time_base)
    stray = np.abs(seconds * float(fps) - np.arange(len(pts)))
    if stray.max() > RATE_TOLERANCE_FRAMES:
        j = int(np.argmax(stray > RATE_TOLERANCE_FRAMES))   # the first
        raise InputError(f"{path}: variable frame rate: frame {j} is shown at {seconds[j]:.4f} s, "
                         f"not {j / float(fps):.4f} s as {float(fps):.3f} fps says (a dropped or "
                         "repeated frame?); re-encode it at a constant rate")


def decode_on_timeline(path, resolution, squash, out_path=None, final=None):
    """The frames of a video on the 60 Hz timeline, uint8 (n_ticks, resolution, resolution, 3) (a
    memmap at out_path when given, `final` naming it in errors), each decoded frame squashed once
    by squash(rgb (H, W, 3) uint8, resolution); and its VideoTimeline. InputError for a bad video,
    including one whose frames do not decode as its packets announce."""
    import av

    timeline = read_timeline(path)
    shape = (timeline.n_ticks, resolution, resolution, 3)
    frames = (common.open_npy_for_writing(out_path, np.uint8, shape, final) if out_path
              else np.empty(shape, np.uint8))
    container, stream = open_video(path)
    decoded = 0
    with container:
        try:
            for j, frame in enumerate(container.decode(stream)):
                if j >= timeline.n_frames:
                    break
                start, end = timeline.first_ticks[j], timeline.first_ticks[j + 1]
                if end > start:   # above 60 fps some frames are shown at no tick
                    frames[start:end] = squash(frame.to_ndarray(format="rgb24"), resolution)
                decoded = j + 1
        except av.error.FFmpegError as err:
            raise InputError(f"{path}: damaged video: frame {decoded} does not decode "
                             f"({err.strerror or err})") from None
    if decoded < timeline.n_frames:
        raise InputError(f"{path}: damaged video: {decoded} of its {timeline.n_frames} frames "
                         "decode")
    if out_path:
        frames.flush()
    return frames, timeline
