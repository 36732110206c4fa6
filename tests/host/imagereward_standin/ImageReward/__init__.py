"""Test stand-in of the ImageReward package's layout (see ../README.md)."""
