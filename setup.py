"""The one compiled part: stage 1's reader of usage events (``schemas/_flat_avro.c``, about six times
fastavro's speed on them). Optional: where it cannot be compiled the install goes on, and
``schemas/codec.py`` reads with fastavro (the worker logs that once). Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("schemas._flat_avro", ["schemas/_flat_avro.c"], optional=True)])
