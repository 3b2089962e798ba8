package memory

import (
	"testing"
	"time"

	"imcloud/adapters/dedupetest"
	"imcloud/pipeline"
)

func TestDedupeContract(t *testing.T) {
	dedupetest.Run(t, func(_ *testing.T, ttl time.Duration) pipeline.DedupeStore { return NewDedupe(ttl) })
}
