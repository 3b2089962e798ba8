package wire

import (
	"errors"
	"strings"
	"testing"
)

func TestValidRoom(t *testing.T) {
	tests := []struct {
		room string
		ok   bool
	}{
		{"live://1000", true},
		{"public://lobby", true},
		{"live://直播", true},
		{"live://" + strings.Repeat("x", MaxRoomLen-len("live://")), true},
		{"live://" + strings.Repeat("x", MaxRoomLen-len("live://")+1), false},
		{"", false},
		{"\xff", false},
		{"live://\xff", false},
		{"live://a\x00", false},
		{"live://a\u0085", false}, // C1 control
		{"live://a\x7f", false},
		{"live://a b", false},
		{"live://a\tb", false},
		{"live://a,b", false},
		{"live://*", false},
		{"live://1*", false},
		{"lobby", false},
		{"://1", false},
		{"live://", false},
	}
	for _, tt := range tests {
		err := ValidRoom(tt.room)
		if (err == nil) != tt.ok {
			t.Errorf("ValidRoom(%q) = %v, want ok %v", tt.room, err, tt.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalid) {
			t.Errorf("ValidRoom(%q) = %v, not ErrInvalid", tt.room, err)
		}
	}
}

func TestValidRoomGrant(t *testing.T) {
	tests := []struct {
		grant string
		ok    bool
	}{
		{"live://1", true},
		{"live://*", true},
		{"live://10*", true},
		{"*", true},
		{"live*", true},
		{"live://*/*", false},
		{"**", false},
		{"live://\xff*", false},
		{"live://a b*", false},
		{"lobby", false},
		{"", false},
	}
	for _, tt := range tests {
		if err := ValidRoomGrant(tt.grant); (err == nil) != tt.ok {
			t.Errorf("ValidRoomGrant(%q) = %v, want ok %v", tt.grant, err, tt.ok)
		}
	}
}

func TestRoomGranted(t *testing.T) {
	tests := []struct {
		grants []string
		room   string
		want   bool
	}{
		{[]string{"live://1"}, "live://1", true},
		{[]string{"live://1"}, "live://10", false},
		{[]string{"live://1"}, "live://", false},
		{[]string{"live://*"}, "live://1", true},
		{[]string{"live://*"}, "live://a/b", true},
		{[]string{"live://*"}, "live2://x", false},
		{[]string{"live://*"}, "xlive://1", false},
		{[]string{"live://*"}, "LIVE://1", false},
		{[]string{"live://10*"}, "live://100", true},
		{[]string{"live://10*"}, "live://1", false},
		{[]string{"*"}, "private://board-meeting", true},
		{[]string{"public://lobby", "live://*"}, "private://board-meeting", false},
		{[]string{"public://lobby", "live://*"}, "public://lobby", true},
		{nil, "live://1", false},
	}
	for _, tt := range tests {
		if got := RoomGranted(tt.grants, tt.room); got != tt.want {
			t.Errorf("RoomGranted(%q, %q) = %v, want %v", tt.grants, tt.room, got, tt.want)
		}
	}
}

func TestValidKeyAndPlatform(t *testing.T) {
	for key, ok := range map[string]bool{
		"4f9c1e1a-6c2b-4d0e-9a51-1f7c1d2e3b4a": true, "user-1": true, "": false, "\xff": false, "a b": false,
		"a,b": false, "a\x00": false, strings.Repeat("k", MaxKeyLen): true, strings.Repeat("k", MaxKeyLen+1): false,
	} {
		if err := ValidKey(key); (err == nil) != ok {
			t.Errorf("ValidKey(%q) = %v, want ok %v", key, err, ok)
		}
	}
	for p, ok := range map[string]bool{"": true, "web": true, "android": true, "\xff": false, "a\nb": false, strings.Repeat("p", MaxPlatformLen+1): false} {
		if err := ValidPlatform(p); (err == nil) != ok {
			t.Errorf("ValidPlatform(%q) = %v, want ok %v", p, err, ok)
		}
	}
}
