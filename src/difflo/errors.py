"""User-facing errors: the CLI prints ``difflo: error: <message>`` and exits with code 2."""


class DiffloError(Exception):
    """A problem with the user's input (config, arguments, files) that names the problem and the fix."""


class ConfigError(DiffloError):
    pass


class CheckpointError(DiffloError):
    pass


class DataError(DiffloError):
    pass
