"""Programs for operators and applications: status, hook, the notify API."""
