"""gpt3d's own error types. Only these are user errors: gpt3d.launch prints their message as
one line (rank 0) and exits with code 2, or 3 for a diverged run. Anything else, including a
ValueError raised inside torch, is a bug or a dead peer and is reported with its traceback."""


class UserError(ValueError):
    """Something the user gave gpt3d is wrong; the message names it and the fix."""


class ConfigError(UserError):
    """A config file, an override, or a layout that cannot run."""


class PlanError(UserError):
    """A tensor-parallel plan file that cannot be applied."""


class DataError(UserError):
    """A token dataset that is missing, damaged or does not fit the model."""


class CheckpointError(UserError):
    """A checkpoint or pretrained-weights source that cannot be read safely."""


class TrainingDiverged(RuntimeError):
    """The loss or the parameters became NaN/Inf (exit code 3)."""


def missing_extra(setting: str, package: str, extra: str) -> ConfigError:
    """The error for an optional feature whose package is not installed."""
    return ConfigError(
        f"{setting} = true needs the {package} package: pip install 'gpt3d[{extra}]' "
        f"(or set {setting} = false)"
    )
