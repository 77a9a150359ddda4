"""guardsync: provision Atlassian Cloud from Microsoft Entra ID."""
