"""One exception type for every user-facing failure, so the CLI can print it without a traceback."""


class BonsaiError(Exception):
    """A problem with the user's input or environment, phrased for the user."""


class CheckpointError(BonsaiError):
    """A source checkpoint is missing, corrupt, or does not match the architecture."""


class RecipeError(BonsaiError):
    """A recipe YAML is malformed or asks for something impossible."""


class PackError(BonsaiError):
    """A pack cannot be produced or read back."""


class OutputExistsError(BonsaiError):
    """The output path exists and --force was not given."""
