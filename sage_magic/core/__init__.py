"""The shared floor: errors, configuration, progress events, files, HTTP; it imports nothing else of ours."""
