"""Typed errors. Every error the service can report is an `OmniError` subclass carrying its HTTP status and
OpenAI error `type`; `deployments/` maps them to responses in one place. Anything else is a bug (HTTP 500).

Status choices:
- 400 for requests that are well-formed JSON but ask for something impossible (bad field, too many tokens,
  unknown voice);
- 413 when a media item is larger than the configured limit;
- 415 for a media type we do not decode (e.g. a PDF as an image);
- 422 when the media type is supported but the bytes do not decode (corrupt PNG, truncated WAV): the request
  is syntactically fine, its content is not processable;
- 400 when a media URL cannot be fetched (as OpenAI does for a bad image URL: the client chose the URL).
Load-time errors (config, checkpoint) are 500: the service is misconfigured, not the request.
"""


class OmniError(Exception):
    status_code: int = 500
    error_type: str = "server_error"

    def __init__(self, message: str, param: str | None = None, item: tuple[str, int] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault (OpenAI's `param`), when there is one
        # the input at fault as (kind, index) among the processor's images, audio or videos, so a caller that
        # knows where each input came from (the HTTP layer) can name its own field
        self.item = item


class ConfigError(OmniError):
    """config.json cannot be turned into an `OmniConfig` (missing or malformed field)."""


class CheckpointError(OmniError):
    """Weights cannot be found, fetched or matched to the module (missing / unexpected tensor names, shapes)."""


class ChatTemplateError(OmniError):
    """The chat template itself is broken: it does not compile, or its code attempts what the sandbox forbids
    (the messages it sees are plain JSON data, so only the template's own code can). The server's fault (500);
    a template refusing the messages (`raise_exception`) or not fitting them is an `InvalidRequestError`."""


class InvalidRequestError(OmniError, ValueError):
    """A request (or a library call such as `OmniModel.generate`) asks for something impossible; also a
    ValueError, the library-level meaning of a bad argument."""

    status_code = 400
    error_type = "invalid_request_error"


class TooManyTokensError(InvalidRequestError):
    """Prompt plus requested output exceed the model's context."""


class UnknownVoiceError(InvalidRequestError):
    """The requested speaker is not in the checkpoint's `talker_config.speaker_id`."""


class MediaTooLargeError(OmniError):
    status_code = 413
    error_type = "invalid_request_error"


class UnsupportedMediaError(OmniError):
    status_code = 415
    error_type = "invalid_request_error"


class MediaDecodeError(OmniError):
    status_code = 422
    error_type = "invalid_request_error"


class MediaFetchError(InvalidRequestError):
    """A media URL could not be fetched (unreachable, HTTP error, timeout, scheme not allowed)."""
