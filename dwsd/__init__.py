"""dwsd: a filesystem-native snapshot daemon for data-science workspaces."""

__version__ = "0.1.0"
