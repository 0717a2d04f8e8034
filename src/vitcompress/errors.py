"""One error type for everything a user can fix; the CLI prints it as one line."""


class VitcompressError(Exception):
    """A problem with the user's input (file, recipe, shape, option), stated in one line."""
