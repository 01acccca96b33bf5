"""What every Unbox process shares and nothing else owns: settings and the error formatter."""
