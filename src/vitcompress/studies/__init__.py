"""Built-in studies (YAML), read by :func:`vitcompress.sweep.load_study` by name."""
