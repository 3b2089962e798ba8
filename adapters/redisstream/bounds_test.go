package redisstream

import "testing"

func TestIDLess(t *testing.T) {
	tests := []struct {
		a, b string
		want bool
	}{
		{"1-0", "2-0", true},
		{"2-0", "1-0", false},
		{"10-0", "9-5", false}, // numeric, not lexical
		{"5-2", "5-10", true},
		{"5-1", "5-1", false},
		{"0-0", "1-1", true},
	}
	for _, tt := range tests {
		if got := idLess(tt.a, tt.b); got != tt.want {
			t.Errorf("idLess(%s, %s) = %v, want %v", tt.a, tt.b, got, tt.want)
		}
	}
}
