package main

import (
	"context"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"imcloud/pipeline/logtest"
	"imcloud/stages/logic/token"
)

// standalone runs `imcloud standalone --anonymous` in-process on free
// loopback ports with JWT secret, and returns its push API and WebSocket
// addresses. It stops when the test ends.
func standalone(t *testing.T, secret string, sets ...string) (api, ws string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var out, errb logtest.Buffer
	done := make(chan error, 1)
	args := []string{"standalone", "--anonymous",
		"--set", "logic.http_addr=127.0.0.1:0", "--set", "logic.grpc_addr=127.0.0.1:0",
		"--set", "cloud.tcp_addr=127.0.0.1:0", "--set", "cloud.ws_addr=127.0.0.1:0", "--set", "cloud.grpc_addr=127.0.0.1:0",
		"--set", "log.level=warn"}
	for _, s := range sets {
		args = append(args, "--set", s)
	}
	go func() { done <- run(ctx, args, &out, &errb, []string{"IMCLOUD_LOGIC__AUTH__JWT_SECRET=" + secret}) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("standalone: %v", err)
		}
	})
	waitFor(t, &out, "Push to the room", &errb)
	welcome := out.String()
	api = regexp.MustCompile(`logic http\s+(\S+)`).FindStringSubmatch(welcome)[1]
	ws = regexp.MustCompile(`cloud ws\s+(\S+)`).FindStringSubmatch(welcome)[1]
	return api, ws
}

// waitFor waits until b holds want.
func waitFor(t *testing.T, b *logtest.Buffer, want string, other *logtest.Buffer) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(b.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q in output:\n%s\nother:\n%s", want, b.String(), other.String())
		}
		time.Sleep(5 * time.Millisecond) // polling a condition, with a deadline
	}
}

func post(t *testing.T, url, body string) {
	t.Helper()
	resp, err := http.Post(url, "text/plain", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST %s: %d", url, resp.StatusCode)
	}
}

// TestListenPrintsPositions: with a --recover token, listen shows where
// each stream starts and prints room and user messages with their stream,
// epoch and position (op 20), broadcasts as plain packets; with a plain
// token it prints what it always did.
func TestListenPrintsPositions(t *testing.T) {
	const secret = "listen-secret"
	api, ws := standalone(t, secret, "history.user.acks=true")
	for _, tc := range []struct {
		name    string
		mid     string
		room    string // its id, of type live
		recover bool
		// want are regular expressions, matched in order, one a line.
		want []string
	}{
		{"plain", "1", "1000", false, []string{
			`^connected: mid=1 key=\S+ rooms=live://1000$`,
			`^op=1000 seq=\d+ to the user$`,
			`^op=1000 seq=\d+ to the room$`,
			`^op=1001 seq=\d+ to all$`,
		}},
		{"recover", "2", "2000", true, []string{
			`^connected: mid=2 key=\S+ rooms=live://2000$`,
			`^positioned delivery on: acks=true$`,
			// One message to user 2 and one to its room came before
			// it connected, and acks are on: the user stream starts at
			// the acknowledged position (none), the room at its top.
			`^  stream=user:2 epoch=[0-9a-f]+ from pos=0$`,
			`^  stream=room:live://2000 epoch=[0-9a-f]+ from pos=1$`,
			// user 2's unacknowledged message comes first.
			`^stream=user:2 epoch=[0-9a-f]+ pos=1 op=1000 seq=\d+ before$`,
			`^stream=user:2 epoch=[0-9a-f]+ pos=2 op=1000 seq=\d+ to the user$`,
			`^stream=room:live://2000 epoch=[0-9a-f]+ pos=2 op=1000 seq=\d+ to the room$`,
			`^op=1001 seq=\d+ to all$`,
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mid, _ := strconv.ParseInt(tc.mid, 10, 64)
			tok, err := token.Sign(secret, token.Claims{Mid: mid, Rooms: []string{"live://" + tc.room}, Recover: tc.recover}, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if tc.recover {
				post(t, "http://"+api+"/im/push/mids?operation=1000&mids="+tc.mid, "before")
				post(t, "http://"+api+"/im/push/room?operation=1000&type=live&room="+tc.room, "before")
			}
			ctx, cancel := context.WithCancel(context.Background())
			var out, errb logtest.Buffer
			done := make(chan error, 1)
			go func() {
				done <- run(ctx, []string{"listen", "--ws", "ws://" + ws + "/sub", "--token", tok}, &out, &errb, nil)
			}()
			defer func() {
				cancel()
				if err := <-done; err != nil {
					t.Errorf("listen: %v", err)
				}
			}()
			// Connected, and past op 21 for a recover token: the next
			// push is live.
			waitFor(t, &out, map[bool]string{false: "connected:", true: "from pos="}[tc.recover], &errb)
			if tc.recover {
				waitFor(t, &out, "before\n", &errb) // the unacknowledged one
			}
			post(t, "http://"+api+"/im/push/mids?operation=1000&mids="+tc.mid, "to the user")
			waitFor(t, &out, map[bool]string{false: "to the user\n", true: "pos=2 op=1000"}[tc.recover], &errb)
			post(t, "http://"+api+"/im/push/room?operation=1000&type=live&room="+tc.room, "to the room")
			waitFor(t, &out, "to the room\n", &errb)
			post(t, "http://"+api+"/im/push/all?operation=1001", "to all")
			waitFor(t, &out, "to all\n", &errb)

			var lines []string
			for _, l := range strings.Split(strings.TrimSpace(out.String()), "\n") {
				if !strings.HasPrefix(l, "heartbeat:") {
					lines = append(lines, l)
				}
			}
			if len(lines) != len(tc.want) {
				t.Fatalf("listen printed %d lines, want %d:\n%s", len(lines), len(tc.want), out.String())
			}
			for i, w := range tc.want {
				if !regexp.MustCompile(w).MatchString(lines[i]) {
					t.Errorf("line %d %q does not match %s\nall:\n%s", i+1, lines[i], w, out.String())
				}
			}
		})
	}
}
