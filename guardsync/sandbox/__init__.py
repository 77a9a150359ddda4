"""Local stand-ins for Microsoft Graph and the Atlassian SCIM API (demo and tests)."""
