"""Identity: VNeID sign-in, our tokens, users, roles and dependents."""
