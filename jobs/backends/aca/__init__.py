"""The Azure Container Apps backend (TUNEOPS_BACKEND=aca): ACA jobs on an Azure Files share, Key Vault secrets,
Log Analytics logs, and the provisioning of the job and the inference app."""
