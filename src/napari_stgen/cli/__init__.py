"""The ``stgen`` command line. ``main.py`` builds the parser; each area registers its commands."""
