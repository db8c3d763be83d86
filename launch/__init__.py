"""Launchers and user commands; nothing imports this package."""
