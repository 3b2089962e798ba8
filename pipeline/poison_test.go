package pipeline

import (
	"testing"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
)

// TestReplayTargetsFor: a message goes back to the shard it was poisoned
// from when that is a target, else to the first; never anywhere else,
// whatever the metadata says.
func TestReplayTargetsFor(t *testing.T) {
	targets := ReplayTargets{"push.0", "push.1", "push.2"}
	tests := []struct {
		name     string
		recorded *string // nil: no PoisonedTopicKey
		want     string
	}{
		{"its own shard", ptr("push.1"), "push.1"},
		{"the last shard", ptr("push.2"), "push.2"},
		{"the first shard", ptr("push.0"), "push.0"},
		{"no record", nil, "push.0"},
		{"empty record", ptr(""), "push.0"},
		{"a shard of a larger push_shards", ptr("push.7"), "push.0"},
		{"the unsharded topic", ptr("push"), "push.0"},
		{"the poison topic", ptr("push.poison"), "push.0"},
		{"a shard padded", ptr(" push.1"), "push.0"},
		{"a shard with a newline", ptr("push.1\n"), "push.0"},
		{"a shard in another case", ptr("PUSH.1"), "push.0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			md := message.Metadata{MetaMessageID: "m"}
			if tt.recorded != nil {
				md[middleware.PoisonedTopicKey] = *tt.recorded
			}
			p := Poisoned{Key: "1", ID: "m", Metadata: md}
			if got := targets.For(p); got != tt.want {
				t.Errorf("For(recorded %v) = %q, want %q", md[middleware.PoisonedTopicKey], got, tt.want)
			}
		})
	}
	if got := (ReplayTargets{"push"}).For(Poisoned{Metadata: message.Metadata{middleware.PoisonedTopicKey: "push.3"}}); got != "push" {
		t.Errorf("one shard: a message of an earlier push_shards goes to %q, want push", got)
	}
}

func ptr(s string) *string { return &s }

// TestReplayTargetsCheck: a list For could not pick from is refused.
func TestReplayTargetsCheck(t *testing.T) {
	for _, bad := range []ReplayTargets{nil, {}, {""}, {"push.0", ""}, {"push.0", "push.1", "push.0"}} {
		if err := bad.Check(); err == nil {
			t.Errorf("Check(%q): nil, want an error", bad)
		}
	}
	for _, good := range []ReplayTargets{{"push"}, {"push.0", "push.1"}} {
		if err := good.Check(); err != nil {
			t.Errorf("Check(%q): %v", good, err)
		}
	}
}

func TestReplayedTotal(t *testing.T) {
	if n := (Replayed{"a": 2, "b": 3}).Total(); n != 5 {
		t.Errorf("total %d, want 5", n)
	}
	if n := Replayed(nil).Total(); n != 0 {
		t.Errorf("total of nil %d, want 0", n)
	}
}
