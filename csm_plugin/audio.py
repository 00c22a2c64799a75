"""PCM helpers: float32 <-> int16, resampling to Mimi's 24 kHz (soxr), reading mono files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soxr

from csm_plugin.errors import AudioError

SAMPLE_RATE = 24000  # Mimi / CSM rate


def float_to_int16(wav: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> int16 PCM (clipped, rounded)."""
    return np.round(np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0) * 32767.0).astype(np.int16)


def int16_to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM -> float32 in [-1, 1)."""
    return np.asarray(pcm, dtype=np.int16).astype(np.float32) / 32768.0


def as_mono(wav: np.ndarray) -> np.ndarray:
    """Validate and flatten to a non-empty 1-D float32 array; [T, 1] / [1, T] are accepted."""
    wav = np.asarray(wav)
    if wav.ndim == 2 and 1 in wav.shape:
        wav = wav.reshape(-1)
    if wav.ndim != 1:
        raise AudioError(f"expected mono audio (1-D), got shape {wav.shape}; mix it down to one channel first")
    if wav.size == 0:
        raise AudioError("audio is empty")
    if wav.dtype == np.int16:
        return int16_to_float(wav)
    wav = wav.astype(np.float32, copy=False)
    if not np.isfinite(wav).all():
        raise AudioError("audio contains NaN or infinite samples")
    return wav


def resample(wav: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """Mono float32 resampling with soxr (high quality); returns round(len * target / source) samples."""
    wav = as_mono(wav)
    if sample_rate <= 0:
        raise AudioError(f"invalid sample rate {sample_rate}")
    if sample_rate == target_rate:
        return wav
    return soxr.resample(wav, sample_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def resample_to_24k(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    return resample(wav, sample_rate, SAMPLE_RATE)


def read_mono(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file as (float32 mono samples, sample rate). Multi-channel files are rejected."""
    import soundfile as sf

    if not Path(path).is_file():
        raise AudioError(f"file {path} does not exist" if not Path(path).exists() else f"{path} is not a file")
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - soundfile raises several types for unreadable input
        raise AudioError(f"cannot read {path} as audio: {e}") from None
    if wav.shape[1] != 1:
        raise AudioError(f"{path} has {wav.shape[1]} channels; only mono audio is supported (mix it down to one channel)")
    return as_mono(wav[:, 0]), int(sr)


def load_audio_24k(path: str | Path) -> np.ndarray:
    """Read a mono file and resample it to 24 kHz float32."""
    wav, sr = read_mono(path)
    return resample_to_24k(wav, sr)
