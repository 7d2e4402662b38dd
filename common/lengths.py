"""Token-count formulas shared by the processor (placeholder expansion) and the encoders."""


def _conv_out(frames: int) -> int:
    """Frames left after the audio front-end's three stride-2 convolutions (kernel 3, padding 1)."""
    for _ in range(3):
        frames = (frames + 1) // 2  # ceil(frames / 2)
    return frames


def audio_token_count(mel_frames: int, n_window: int = 50) -> int:
    """Audio-encoder output tokens for `mel_frames` valid mel frames.

    The encoder cuts audio into chunks of 2·n_window frames (13 tokens each when full); the remainder chunk
    gives ceil(ceil(ceil(r/2)/2)/2) tokens.
    """
    chunk = 2 * n_window
    return (mel_frames // chunk) * _conv_out(chunk) + _conv_out(mel_frames % chunk)
