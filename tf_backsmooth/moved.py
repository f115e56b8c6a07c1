"""Names that moved to another module fail with the new place, never silently.

A module lists its moved names, ``{old name: "tf_backsmooth.module.new_name"}``,
and sets ``__getattr__ = moved.getattr_for(__name__, MOVED)``: reading one
raises ``AttributeError`` naming where it is now.
"""


def getattr_for(module, table):
    """A module ``__getattr__`` for ``table``'s moved names."""

    def __getattr__(name):  # noqa: N807
        if name in table:
            raise AttributeError(f"{module}.{name} moved: use {table[name]}")
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
