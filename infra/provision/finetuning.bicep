// The base environment for tuneops, in the layout of AI Toolkit's remote fine-tuning template: an Azure Files share,
// Log Analytics, a Container Apps environment with a Consumption and a GPU workload profile, the share as environment
// storage, Key Vault (RBAC), a user-assigned identity for the job, and the fine-tuning job itself. The GPU profile is
// serverless (no instance counts) unless gpuProfileType names a dedicated type.
// The outputs are the keys of infra/finetuning.config.json.

param defaultCommands array
param maximumInstanceCount int = 1
param timeout int = 10800
param location string = resourceGroup().location

@description('Workload profile type of the GPU profile: serverless Consumption-GPU-* (billed per replica, the default; NC8as-T4 is the small one) or dedicated NCxx-A100 (billed per node, 0 to maximumInstanceCount nodes).')
@allowed([
  'Consumption-GPU-NC24-A100'
  'Consumption-GPU-NC8as-T4'
  'NC24-A100'
  'NC48-A100'
  'NC96-A100'
])
param gpuProfileType string = 'Consumption-GPU-NC24-A100'
@description('The job image: the payload image built from the Dockerfile (target payload), or the seed PyTorch image.')
param image string = 'docker.io/pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime'
@description('Object id of the identity the bot runs as (its managed identity, or your user for a laptop); empty: no role assignments for the bot.')
param botPrincipalId string = ''
@allowed(['ServicePrincipal', 'User', 'Group'])
param botPrincipalType string = 'ServicePrincipal'

param resourceSuffix string = substring(uniqueString(resourceGroup().id), 0, 5)
param storageAccountName string = 'aistorage${resourceSuffix}'
param fileShareName string = 'aifileshare${resourceSuffix}'
param acaEnvironmentName string = 'aienv${resourceSuffix}'
param acaEnvironmentStorageName string = 'aienvstorage${resourceSuffix}'
param acaJobName string = 'aiacajob${resourceSuffix}'
param acaLogAnalyticsName string = 'ailog${resourceSuffix}'
param keyVaultName string = 'aikv${resourceSuffix}'
// A deleted resource group leaves its Key Vault soft-deleted, and the name (uniqueString of the group's id, which a
// recreated group of the same name repeats) stays taken for softDeleteRetentionInDays (Azure/bicep#7529). 'recover'
// takes that vault and its secrets back; it fails with SoftDeletedVaultDoesNotExist when there is none (AzureCosmosDB/
// OmniVec#23), and keeps the old vault's settings (Azure/azure-rest-api-specs#21306): deploy again with 'default' after.
@allowed(['default', 'recover'])
param keyVaultCreateMode string = 'default'
param identityName string = 'aiid${resourceSuffix}'

var defaultCommand = join(defaultCommands, '; ')
// One entry per GPU workload profile type, with the figures of jobs/backends/aca/profiles.py (tests/azure/test_aca_infra.py
// holds them equal): what one replica may ask for, and whether the profile is dedicated. Only a dedicated profile takes
// minimumCount/maximumCount; on a serverless one Azure refuses them with WorkloadProfilePropertyNotSupported ("Workload
// Profile property 'MinimumCount' is not supported for Consumption_GPU_NC24_A100"): hashicorp/terraform-provider-azurerm
// issue 31763, Azure/azure-cli issue 30526.
var gpuProfiles = {
  'Consumption-GPU-NC24-A100': {
    dedicated: false
    cpu: 24
    memory: '220Gi'
  }
  'Consumption-GPU-NC8as-T4': {
    dedicated: false
    cpu: 8
    memory: '56Gi'
  }
  'NC24-A100': {
    dedicated: true
    cpu: 24
    memory: '220Gi'
  }
  'NC48-A100': {
    dedicated: true
    cpu: 48
    memory: '440Gi'
  }
  'NC96-A100': {
    dedicated: true
    cpu: 96
    memory: '880Gi'
  }
}
var gpuProfile = gpuProfiles[gpuProfileType]
var gpuWorkloadProfile = {
  workloadProfileType: gpuProfileType
  name: 'GPU'
}
var dedicatedCounts = {
  minimumCount: 0
  maximumCount: maximumInstanceCount
}
var roles = {
  contributor: 'b24988ac-6180-42a0-ab88-20f7382dd24c'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
  keyVaultSecretsOfficer: 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
  storageFileDataPrivilegedContributor: '69566ab7-960f-475b-8e7c-b3118f30c6bd'
  logAnalyticsReader: '73c42c96-874c-492b-b04d-ab87d138a893'
}

resource storageAccount 'Microsoft.Storage/storageAccounts@2023-01-01' = {
  sku: {
    name: 'Standard_LRS'
  }
  kind: 'StorageV2'
  name: storageAccountName
  location: location
  properties: {
    largeFileSharesState: 'Enabled'
    minimumTlsVersion: 'TLS1_2'
  }
}

resource defaultFileService 'Microsoft.Storage/storageAccounts/fileServices@2023-01-01' = {
  parent: storageAccount
  name: 'default'
  properties: {
    shareDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource fileShare 'Microsoft.Storage/storageAccounts/fileServices/shares@2023-01-01' = {
  parent: defaultFileService
  name: fileShareName
  properties: {
    shareQuota: 1024
  }
}

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2022-10-01' = {
  name: acaLogAnalyticsName
  location: location
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: 30
  }
}

resource environment 'Microsoft.App/managedEnvironments@2024-03-01' = {
  name: acaEnvironmentName
  location: location
  properties: {
    zoneRedundant: false
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: logAnalytics.properties.customerId
        sharedKey: logAnalytics.listKeys().primarySharedKey
      }
    }
    workloadProfiles: [
      {
        workloadProfileType: 'Consumption'
        name: 'Consumption'
      }
      gpuProfile.dedicated ? union(gpuWorkloadProfile, dedicatedCounts) : gpuWorkloadProfile
    ]
  }
}

resource envStorage 'Microsoft.App/managedEnvironments/storages@2024-03-01' = {
  parent: environment
  name: acaEnvironmentStorageName
  properties: {
    azureFile: {
      accountName: storageAccount.name
      accountKey: storageAccount.listKeys().keys[0].value
      shareName: fileShare.name
      accessMode: 'ReadWrite'
    }
  }
}

resource keyVault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: keyVaultName
  location: location
  properties: {
    tenantId: subscription().tenantId
    createMode: keyVaultCreateMode
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 7
  }
}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: identityName
  location: location
}

// The job reads its secrets (HF_TOKEN, WANDB_API_KEY) through Key Vault references with this identity.
resource jobReadsSecrets 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(keyVault.id, identity.id, roles.keyVaultSecretsUser)
  scope: keyVault
  properties: {
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsUser)
  }
}

// The bot: create, update, start and stop jobs and apps (and assign the identity to them) in this resource group;
// write and list secrets; sync files to the share over OAuth; query the console logs.
resource botManagesApps 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(botPrincipalId)) {
  name: guid(resourceGroup().id, botPrincipalId, roles.contributor)
  properties: {
    principalId: botPrincipalId
    principalType: botPrincipalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.contributor)
  }
}

resource botWritesSecrets 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(botPrincipalId)) {
  name: guid(keyVault.id, botPrincipalId, roles.keyVaultSecretsOfficer)
  scope: keyVault
  properties: {
    principalId: botPrincipalId
    principalType: botPrincipalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsOfficer)
  }
}

resource botSyncsFiles 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(botPrincipalId)) {
  name: guid(storageAccount.id, botPrincipalId, roles.storageFileDataPrivilegedContributor)
  scope: storageAccount
  properties: {
    principalId: botPrincipalId
    principalType: botPrincipalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageFileDataPrivilegedContributor)
  }
}

resource botReadsLogs 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(botPrincipalId)) {
  name: guid(logAnalytics.id, botPrincipalId, roles.logAnalyticsReader)
  scope: logAnalytics
  properties: {
    principalId: botPrincipalId
    principalType: botPrincipalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.logAnalyticsReader)
  }
}

resource acajob 'Microsoft.App/jobs@2024-03-01' = {
  name: acaJobName
  location: location
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    environmentId: environment.id
    workloadProfileName: 'GPU'
    configuration: {
      triggerType: 'Manual'
      replicaTimeout: timeout
      replicaRetryLimit: 0
      manualTriggerConfig: {
        replicaCompletionCount: 1
        parallelism: 1
      }
    }
    template: {
      containers: [
        {
          image: image
          name: acaJobName
          command: [
            '/bin/bash'
            '-c'
            defaultCommand
          ]
          resources: {
            cpu: gpuProfile.cpu
            memory: gpuProfile.memory
          }
          volumeMounts: [
            {
              volumeName: '${fileShareName}volume'
              mountPath: '/mount'
            }
          ]
        }
      ]
      volumes: [
        {
          name: '${fileShareName}volume'
          storageType: 'AzureFile'
          storageName: envStorage.name
        }
      ]
    }
  }
  dependsOn: [
    jobReadsSecrets
  ]
}

output SUBSCRIPTION_ID string = subscription().subscriptionId
output RESOURCE_GROUP_NAME string = resourceGroup().name
output STORAGE_ACCOUNT_NAME string = storageAccount.name
output FILE_SHARE_NAME string = fileShare.name
output ACA_JOB_NAME string = acajob.name
output COMMANDS array = defaultCommands
output KEY_VAULT_URL string = keyVault.properties.vaultUri
output IDENTITY_ID string = identity.id
output LOG_ANALYTICS_WORKSPACE_ID string = logAnalytics.properties.customerId
output LOG_ANALYTICS_WORKSPACE_NAME string = logAnalytics.name
output ACA_ENVIRONMENT_NAME string = environment.name
output ACA_ENVIRONMENT_STORAGE_NAME string = envStorage.name
output WORKLOAD_PROFILE_TYPE string = gpuProfileType
