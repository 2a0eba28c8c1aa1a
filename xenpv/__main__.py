import sys

try:
    # A Ctrl-C while the modules load (before `main` handles signals) is an interruption
    # like any other: one line and 130, not a traceback from inside an import.
    from xenpv.cli import main

    code = main()
except KeyboardInterrupt:
    print("xenpv: interrupted", file=sys.stderr)
    code = 130
sys.exit(code)
