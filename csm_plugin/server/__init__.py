"""The csm-plugin server."""
