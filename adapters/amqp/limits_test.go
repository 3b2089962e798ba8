package amqp

import (
	"fmt"
	"testing"
)

func TestLimitsArgs(t *testing.T) {
	limits := Limits{"bounded": 5, "zero": 0}
	tests := []struct {
		queue string
		want  string
	}{
		{"bounded", "map[x-max-length:5 x-overflow:reject-publish x-queue-version:2]"},
		{"zero", "map[x-queue-version:2]"},
		{"unlisted", "map[x-queue-version:2]"},
	}
	for _, tt := range tests {
		if got := fmt.Sprint(limits.args(tt.queue)); got != tt.want {
			t.Errorf("args(%s) = %s, want %s", tt.queue, got, tt.want)
		}
	}
	if got := fmt.Sprint(Limits(nil).args("q")); got != "map[x-queue-version:2]" {
		t.Errorf("nil limits: %s", got)
	}
}
