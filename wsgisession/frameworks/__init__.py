"""The front doors that give a framework its own session API over :mod:`wsgisession.core`."""
