"""Unbox HTTP front end: settings, image intake, routes, CLI."""
