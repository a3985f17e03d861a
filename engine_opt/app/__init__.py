"""The application: the ``engine-opt`` command and its built-in tasks. Imports the layers below."""
