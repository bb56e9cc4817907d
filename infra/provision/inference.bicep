// The inference app in the environment that finetuning.bicep made: payload.serve (Gradio UI, OpenAI-compatible API,
// /healthz) on port 7860 with external ingress, scaled to zero when idle (the seed keeps one A100 on around the clock).
// The outputs are the keys of infra/inference.config.json.

param location string = resourceGroup().location
param defaultCommands array
param maximumInstanceCount int = 1
@description('The app image: the payload image built from the Dockerfile (target payload), or the seed PyTorch image.')
param image string = 'docker.io/pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime'
@description('Workload profile type of the environment\'s GPU profile (finetuning.bicep\'s gpuProfileType, its output WORKLOAD_PROFILE_TYPE): it sets the app\'s CPU and memory.')
@allowed([
  'Consumption-GPU-NC24-A100'
  'Consumption-GPU-NC8as-T4'
  'NC24-A100'
  'NC48-A100'
  'NC96-A100'
])
param gpuProfileType string = 'Consumption-GPU-NC24-A100'

param resourceSuffix string = substring(uniqueString(resourceGroup().id), 0, 5)
param storageAccountName string = 'aistorage${resourceSuffix}'
param fileShareName string = 'aifileshare${resourceSuffix}'
param acaEnvironmentName string = 'aienv${resourceSuffix}'
param acaEnvironmentStorageName string = 'aienvstorage${resourceSuffix}'
param acaAppName string = 'aiacaapp${resourceSuffix}'
param identityName string = 'aiid${resourceSuffix}'

var defaultCommand = join(defaultCommands, '; ')
// What one replica may ask for on each GPU workload profile type: the figures of jobs/backends/aca/profiles.py, as in
// finetuning.bicep (tests/azure/test_aca_infra.py holds both equal to it).
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

resource storageAccount 'Microsoft.Storage/storageAccounts@2023-01-01' existing = {
  name: storageAccountName
}

resource environment 'Microsoft.App/managedEnvironments@2024-03-01' existing = {
  name: acaEnvironmentName
}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' existing = {
  name: identityName
}

resource acaApp 'Microsoft.App/containerApps@2024-03-01' = {
  name: acaAppName
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
      activeRevisionsMode: 'Single'
      ingress: {
        external: true
        targetPort: 7860
        transport: 'Auto'
        allowInsecure: false
        traffic: [
          {
            latestRevision: true
            weight: 100
          }
        ]
      }
    }
    template: {
      containers: [
        {
          image: image
          name: acaAppName
          command: [
            '/bin/bash'
            '-c'
            defaultCommand
          ]
          resources: {
            cpu: gpuProfile.cpu
            memory: gpuProfile.memory
          }
          probes: [
            {
              type: 'Startup'
              httpGet: {
                path: '/healthz'
                port: 7860
                scheme: 'HTTP'
              }
              initialDelaySeconds: 30
              periodSeconds: 30
              failureThreshold: 40
              timeoutSeconds: 5
            }
            {
              type: 'Liveness'
              httpGet: {
                path: '/healthz'
                port: 7860
                scheme: 'HTTP'
              }
              periodSeconds: 30
              failureThreshold: 3
              timeoutSeconds: 5
            }
            {
              type: 'Readiness'
              httpGet: {
                path: '/healthz'
                port: 7860
                scheme: 'HTTP'
              }
              periodSeconds: 10
              failureThreshold: 3
              timeoutSeconds: 5
            }
          ]
          volumeMounts: [
            {
              volumeName: '${fileShareName}volume'
              mountPath: '/mount'
            }
          ]
        }
      ]
      scale: {
        minReplicas: 0
        maxReplicas: maximumInstanceCount
      }
      volumes: [
        {
          name: '${fileShareName}volume'
          storageType: 'AzureFile'
          storageName: acaEnvironmentStorageName
        }
      ]
    }
  }
}

output SUBSCRIPTION_ID string = subscription().subscriptionId
output RESOURCE_GROUP_NAME string = resourceGroup().name
output STORAGE_ACCOUNT_NAME string = storageAccount.name
output FILE_SHARE_NAME string = fileShareName
output ACA_APP_NAME string = acaApp.name
output ACA_APP_ENDPOINT string = acaApp.properties.configuration.ingress.fqdn
