"""Service functions: the API's logic, callable without HTTP (a session, a principal, plain values)."""
