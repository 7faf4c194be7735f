"""Flags shared by every entry point: both spellings (--real-dir / --real_dir), and --help with defaults."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and shows each flag's default (None and False are left out)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default is not None and action.default is not False \
                and action.default not in ([], argparse.SUPPRESS) and "%(default)" not in text and "default" not in text:
            text += " (default: %(default)s)"
        return text


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Register --name and, where it differs, --name-with-dashes (both spellings work everywhere)."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*names, dest=name, **kwargs)
