"""HTTP routes: thin, each reads the request, calls one service function and returns a public schema."""
