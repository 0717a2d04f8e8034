"""Compression steps, one module per technique, found through :mod:`.registry` by recipe key;
:mod:`.recipe` parses, validates and applies an ordered list of them."""
