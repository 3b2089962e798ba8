package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"testing"
	"time"

	"imcloud/stages/logic/token"
)

func (h *harness) get(path string, out any) int {
	h.t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+h.addrs.HTTP+path, nil)
	req.Header.Set("Authorization", "Bearer "+testAPIKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var rep struct {
		Code int             `json:"code"`
		Data json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		h.t.Fatalf("GET %s: %q", path, b)
	}
	if out != nil && resp.StatusCode == 200 {
		if err := json.Unmarshal(rep.Data, out); err != nil {
			h.t.Fatalf("GET %s data %s: %v", path, rep.Data, err)
		}
	}
	return resp.StatusCode
}

// TestOnlineStatsAcrossNodes: the statistics routes count the clients of
// both cloud nodes once the nodes have reported.
func TestOnlineStatsAcrossNodes(t *testing.T) {
	a := start(t, "cloud.renew_interval=50ms", "cloud.weight=1")
	b := start(t, "stages=cloud", "cloud.renew_interval=50ms", "cloud.weight=3", "cloud.logic_addr="+a.addrs.LogicGRPC)
	a.connect("ws", token.Claims{Mid: 1, Rooms: []string{"live://1", "live://2"}})
	a.connect("tcp", token.Claims{Mid: 2, Rooms: []string{"live://1"}})
	b.connect("ws", token.Claims{Mid: 3, Rooms: []string{"live://1"}})
	b.connect("tcp", token.Claims{Mid: 4, Rooms: []string{"chat://9"}})

	deadline := time.Now().Add(wait)
	for {
		var total map[string]int
		a.get("/im/online/total", &total)
		if total["conn_count"] == 4 {
			if total["ip_count"] != 2 { // one loopback address per node
				t.Fatalf("total %v, want 4 connections from 2 IPs (1 per node)", total)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("online total %v, want 4 connections", total)
		}
		time.Sleep(20 * time.Millisecond) // polling a condition, with a deadline
	}

	var rooms map[string]int
	if code := a.get("/goim/online/room?type=live&rooms=1&rooms=2&rooms=3", &rooms); code != 200 {
		t.Fatalf("online/room: %d", code)
	}
	if rooms["1"] != 3 || rooms["2"] != 1 || rooms["3"] != 0 {
		t.Fatalf("room counts %v, want 1:3 2:1 3:0", rooms)
	}
	var top []struct {
		RoomID string `json:"room_id"`
		Count  int    `json:"count"`
	}
	a.get("/im/online/top?type=live&limit=1", &top)
	if len(top) != 1 || top[0].RoomID != "1" || top[0].Count != 3 {
		t.Fatalf("top %v, want [1:3]", top)
	}
	var weighted struct {
		Nodes []struct {
			Host   string `json:"host"`
			WSPort int    `json:"ws_port"`
			Weight int    `json:"weight"`
		} `json:"nodes"`
		Heartbeat int `json:"heartbeat"`
	}
	a.get("/im/nodes/weighted?platform=web", &weighted)
	// Both nodes hold two clients; b has three times a's weight, so it leads.
	if len(weighted.Nodes) != 2 || weighted.Nodes[0].Weight != 3 || weighted.Nodes[0].WSPort == 0 || weighted.Nodes[0].Host == "" {
		t.Fatalf("weighted nodes %+v, want b (weight 3) first with its ws port", weighted.Nodes)
	}
	for _, bad := range []string{"/im/online/top", "/im/online/top?type=live&limit=0", "/im/online/room?type=live"} {
		if code := a.get(bad, nil); code != http.StatusBadRequest {
			t.Errorf("GET %s: %d, want 400", bad, code)
		}
	}
}
