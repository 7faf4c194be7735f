"""Placeholder until its issue lands: prints a clear message and exits 2."""
import sys

if __name__ == "__main__":
    print(f"{sys.argv[0]}: not implemented yet", file=sys.stderr)
    sys.exit(2)
