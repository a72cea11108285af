"""Exceptions with messages meant for the user: each names the file, field or value at fault."""


class FedsynthError(Exception):
    """Base class of every error fedsynth reports to the user (the CLI prints it, no traceback)."""


class ConfigError(FedsynthError):
    """The experiment YAML is missing, unreadable or invalid."""


class DataError(FedsynthError):
    """A CSV manifest or an image it points to is missing, unreadable or of the wrong shape."""


class CheckpointError(FedsynthError):
    """A checkpoint is missing, corrupt or does not match the model."""


class WeightsError(FedsynthError):
    """Group-keyed weights do not match the model (unknown key, missing key, wrong shape)."""


class OutputError(FedsynthError):
    """An output path cannot be written (a file where a folder is needed, no space left, no permission)."""


#: how a site's refusal reads when it reaches the coordinator (the coordinator looks for it)
REFUSAL = "refused by the site's own policy"


class PolicyRefused(ConfigError):
    """A site refuses the coordinator's config (weaker than its privacy floor, or past its privacy
    budget). The message, with the floor's values, stays in the site's log; what the coordinator
    learns is :meth:`public`: that the site refused, and which fields."""

    def __init__(self, message: str, fields: tuple[str, ...] = (), site: str | None = None) -> None:
        super().__init__(message)
        self.fields, self.site = tuple(fields), site

    def public(self) -> str:
        """What may leave the site: the refusal and the field names, never the site's values."""
        who = f"site '{self.site}'" if self.site else "the site"
        return f"{who}: {REFUSAL} ({', '.join(self.fields) or 'its privacy policy'})"


class SiteFailure(FedsynthError):
    """What a site tells the coordinator when a round failed: the error's type, never its details
    (they may hold paths or subject ids and stay in the site's own log)."""


class TrainingDiverged(FedsynthError):
    """Training produced non-finite weights; nothing was written (the last good checkpoint stays)."""


class MissingExtra(FedsynthError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, what: str) -> None:
    """Raise :class:`MissingExtra` (``pip install 'fedsynth[extra]'``) unless ``module`` can be imported."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingExtra(f"{what} needs {module}, which is not installed: pip install 'fedsynth[{extra}]'")
