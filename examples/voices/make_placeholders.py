"""Write PLACEHOLDER audio for every clip a voices file names, so the file loads and the plumbing
(CLI, server, adapters) can be tried before real recordings exist.

    python examples/voices/make_placeholders.py                       # examples/voices/voices.json
    python examples/voices/make_placeholders.py my/voices.json --force  # overwrite existing clips

The clips are NOT speech: a buzzing tone whose pitch, pace and loudness differ per style
(formal: low and steady, casual: quicker, comforting: slow and soft, motivating: high and loud).
A real model conditioned on them sounds wrong. Replace every one with a real recording of the
transcript next to it (docs/voices.md: one speaker, clean, 3-10 s, the exact words). Existing
files are kept unless --force, so running this never overwrites your recordings by accident.
Needs numpy and soundfile (both come with csm-plugin).
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf

HERE = Path(__file__).resolve().parent
RATE = 16_000  # any rate works; 16 kHz keeps the files small
# (pitch Hz, syllables per second, loudness) per style; anything else gets the last row
CHARACTER = {
    "formal": (110.0, 3.5, 0.25),
    "casual": (150.0, 5.0, 0.3),
    "comforting": (120.0, 2.5, 0.15),
    "motivating": (190.0, 4.5, 0.4),
    "": (140.0, 4.0, 0.25),
}


def placeholder(text: str, kind: str, speaker: int = 0, rate: int = RATE) -> np.ndarray:
    """A speech-length buzz for `text` (about its spoken length, 1.5-8 s): a pitched pulse train
    with syllable-rate loudness, deterministic for the same arguments."""
    pitch, pace, loudness = CHARACTER.get(kind, CHARACTER[""])
    pitch *= 1.25 if speaker % 2 else 1.0  # the other side of the exchange sounds different
    seconds = float(np.clip(len(text.split()) / (pace * 0.8), 1.5, 8.0))
    rng = np.random.default_rng(zlib.crc32(f"{kind}/{speaker}/{text}".encode()))
    t = np.arange(int(seconds * rate)) / rate
    f0 = pitch * (1 + 0.08 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)))  # a little intonation
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))  # buzzy, like a glottal source
    syllables = 0.5 * (1 - np.cos(2 * np.pi * pace * t)) ** 2
    wav = voiced * syllables + 0.02 * rng.standard_normal(len(t))
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.05)
    wav = wav * fade
    return (loudness * wav / np.abs(wav).max()).astype(np.float32)


def clips(voices_file: Path) -> list[tuple[Path, str, str, int]]:
    """(path, text, kind, speaker) for every clip the file names (voices and style exemplars)."""
    data = json.loads(voices_file.read_text())
    sections = data if any(k in data for k in ("voices", "styles")) else {
        "voices": {k: v for k, v in data.items() if isinstance(v, dict)},
        "styles": {k: v for k, v in data.items() if isinstance(v, list)},
    }
    out = [(voices_file.parent / v["audio"], v["text"], "", 0) for v in sections.get("voices", {}).values()]
    for style, exemplars in sections.get("styles", {}).items():
        out += [(voices_file.parent / e["audio"], e["text"], style, e["speaker"]) for e in exemplars]
    return out


def make_placeholders(voices_file: str | Path = HERE / "voices.json", *, force: bool = False) -> list[Path]:
    """Write a placeholder for every clip of `voices_file` (JSON) that does not exist yet (all of
    them with force); returns the paths written."""
    written = []
    for path, text, kind, speaker in clips(Path(voices_file)):
        if path.exists() and not force:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), placeholder(text, kind, speaker), RATE, subtype="PCM_16")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("voices_file", nargs="?", default=str(HERE / "voices.json"), help="a JSON voices file")
    parser.add_argument("--force", action="store_true", help="overwrite clips that exist (your recordings too)")
    args = parser.parse_args(argv)
    try:
        written = make_placeholders(args.voices_file, force=args.force)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: cannot read {args.voices_file}: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote placeholder {path}")
    print(f"{len(written)} placeholder clip(s) written. They are NOT speech: replace each with a real recording "
          "of its transcript (docs/voices.md).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
