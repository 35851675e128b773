"""The one exception a command raises for a problem the operator can fix."""


class UserError(Exception):
    """A problem with what the operator asked for; the message is shown as is (on one line)."""
