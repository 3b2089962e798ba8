package memory

import (
	"testing"
	"time"

	"imcloud/adapters/registrytest"
)

func TestRegistryContract(t *testing.T) {
	registrytest.Run(t, func(_ *testing.T, sessionTTL, nodeTTL time.Duration) registrytest.Registry {
		return New(sessionTTL, nodeTTL)
	})
}
